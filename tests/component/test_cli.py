"""The operator's command against a real installation (no daemons needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(60)


def test_init_refuses_to_overwrite(installation: Installation) -> None:
    before = installation.config_path.read_text()
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", "init", "--dir", str(installation.root), "--domain", "other.org"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 1 and "not overwriting" in r.stderr
    assert installation.config_path.read_text() == before


def test_init_creates_config_database_and_certificate(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "x")
    assert (inst.root / "mailroom.db").is_file()
    assert (inst.root / "tls" / "cert.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert oct((inst.root / "tls" / "key.pem").stat().st_mode)[-3:] == "600"


def test_config_from_environment(installation: Installation) -> None:
    env = dict(os.environ, MAILROOM_CONFIG=str(installation.config_path))
    r = subprocess.run([sys.executable, "-m", "cli.main", "user", "list"], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0
    assert "alice@example.org  maildir" in r.stdout and "bob@example.org  mbox" in r.stdout


def test_user_outside_local_domains_is_refused(installation: Installation) -> None:
    r = installation.cli("user", "add", "eve@elsewhere.org", "--password-stdin", stdin="pw\n")
    assert r.returncode == 1 and "not in a local domain" in r.stderr


def test_trace_of_unknown_id_fails(installation: Installation) -> None:
    r = installation.cli("trace", "0123456789ABCDEF01", "--json")
    assert r.returncode == 1 and "no such message" in r.stderr


def test_config_show_json(installation: Installation) -> None:
    r = installation.cli("config", "show", "--json")
    data = json.loads(r.stdout)
    assert data["mta"]["smtp"] == [f"127.0.0.1:{installation.ports['smtp']}"]  # a listener setting is a list


def test_run_stops_every_daemon_on_ctrl_c(installation: Installation) -> None:
    installation.start()
    assert installation.supervisor is not None
    pids = [installation.program_pid(p) for p in ("msa", "mta", "qmgr", "mda")]
    installation.supervisor.send_signal(signal.SIGINT)  # what Ctrl-C sends
    installation.supervisor.wait(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if _alive(p)]
    installation.stop()
    assert alive == []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not reaped it yet


def test_user_del_says_which_aliases_still_point_to_the_user(installation: Installation) -> None:
    assert installation.cli("alias", "add", "sales@example.org", "alice@example.org", "bob@example.org").returncode == 0
    r = installation.cli("user", "del", "alice@example.org")
    assert r.returncode == 0, r.stderr
    assert "alias sales@example.org still points to alice@example.org" in r.stdout
    assert "alice@example.org" not in installation.cli("user", "list").stdout
