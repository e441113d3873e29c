"""A backup of an installation whose database is PostgreSQL: `pg_dump` (one transaction, a
consistent dump) goes into the snapshot, and `mailroom restore` puts it beside the config
for `pg_restore`, which brings the database back as it was."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.users import add_user
from tests.support.postgres import PostgresServer
from tests.support.suite import Installation, _reachable

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path) as server:
        yield server


def test_a_postgresql_installation_is_backed_up_with_pg_dump(tmp_path: Path, postgres: PostgresServer) -> None:
    inst = Installation(tmp_path / "mailroom")
    inst.set("mailroom", "database", json.dumps(postgres.url))
    for leftover in inst.root.glob("mailroom.db*"):
        leftover.unlink()
    add_user(inst, "alice@example.org")
    assert inst.cli("backup", "init").returncode == 0
    made = inst.cli("backup")
    assert made.returncode == 0, made.stderr
    assert "database: pg_dump" in inst.cli("backup", "list").stdout
    into = _reachable(tmp_path / "restored")
    r = inst.cli("restore", str(inst.root / "backup"), "--into", str(into), "--key", str(inst.root / "backup.key"))
    assert r.returncode == 0, r.stderr
    dump = into / "database.pgdump"
    assert "pg_restore --no-owner --clean --if-exists --dbname=URL" in r.stdout and dump.exists()
    assert not list(into.glob("mailroom.db*"))
    assert inst.cli("user", "del", "alice@example.org").returncode == 0  # lost since the backup
    url = postgres.url.replace("postgresql+psycopg://", "postgresql://")
    loaded = subprocess.run(["pg_restore", "--no-owner", "--clean", "--if-exists", f"--dbname={url}", str(dump)],
                            capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert "alice@example.org" in inst.cli("user", "list").stdout
