"""The cluster run at test size (tests/cluster.py): two MX nodes and a store on one PostgreSQL,
one MX host killed with kill -9 and the other frozen for twice the lease, nothing lost,
nothing doubled, and the killed host's mail delivered within the lease and 10 s."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import cluster
from tests.support.postgres import PostgresServer

pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.timeout(600)]

LEASE = 10.0


def test_a_host_killed_and_a_host_frozen_lose_and_double_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path.chmod(0o711)  # the postgres and mailroom users reach their folders by path
    with PostgresServer(tmp_path / "postgresql", settings=cluster.postgresql_settings(LEASE)) as pg:
        status = cluster.run(messages=600, sessions=20, rate=8.0, lease=LEASE, root=tmp_path / "nodes",
                             database=pg.url, seed=26)
    out = capsys.readouterr().out
    summary = re.search(r"^accepted=(\d+) delivered=(\d+) lost=(\d+) duplicates=(\d+) max_delay_s=([\d.]+)$",
                        out, re.M)
    assert summary, out
    accepted, delivered, lost, duplicates = map(int, summary.groups()[:4])
    max_delay = float(summary.group(5))
    assert accepted == 600 and delivered == accepted and lost == 0 and duplicates == 0, out
    held = re.search(r"^killed node mx1: it held (\d+) claims; (\d+) of its recipients", out, re.M)
    # The lease had work to bring back, and brought it back.
    assert held and 0 < int(held.group(1)) <= int(held.group(2)), out
    assert max_delay <= LEASE + cluster.GRACE, out
    assert re.search(r"^t=\+[\d.]+s SIGSTOP mx2: \d+ processes", out, re.M), out
    assert status == 0, out
