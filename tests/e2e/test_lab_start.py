"""`mailroom lab start` as a learner runs it: the command itself starts Mailroom and the lab Internet,
a scenario's message goes through to the lab MX host, and stopping the command (by its pid) stops
everything it started.

The lab installation is made first with the command's own helper, then moved to free loopback
ports (the defaults may be taken by another test run on this machine).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import lab as labcmd
from lab import scenarios
from tests.support.suite import LISTENERS, _reachable, free_port, wait_port

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait(predicate: object, what: str, log: Path, timeout: float = 40.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n--- lab start's output ---\n{log.read_text()[-3000:]}")


def test_lab_start_runs_the_lab_and_a_scenario_goes_through(tmp_path: Path) -> None:
    base = _reachable(tmp_path / "var-lab")
    assert labcmd.create(base, 600) == 0
    conf = base / "mailroom.toml"
    text = conf.read_text()
    ports: dict[str, int] = {}
    for (_, key), default in LISTENERS.items():
        ports[key] = free_port()
        text = text.replace(f'{key} = "{default}"', f'{key} = "127.0.0.1:{ports[key]}"')
    dns, mx = free_port(udp=True), free_port()
    text = text.replace(f'"{labcmd.LAB_DNS}"', f'"127.0.0.1:{dns}"').replace(
        f"remote_port = {labcmd.LAB_MX_PORT}", f"remote_port = {mx}")
    policy, dnssec = free_port("127.0.0.20"), free_port(udp=True)
    text = text.replace(f"mta_sts_port = {labcmd.LAB_POLICY_PORT}", f"mta_sts_port = {policy}").replace(
        f'"{labcmd.LAB_DNSSEC}"', f'"127.0.0.1:{dnssec}"')
    conf.write_text(text)

    log = tmp_path / "lab-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "lab", "start", "--dir", str(base)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        for key in ("submission", "smtp", "lmtp"):
            wait_port(ports[key], timeout=40)
        accepts = scenarios.BY_NAME["accepts"]
        [host] = [h for h in scenarios.listening_hosts() if h.name == "mx.accepts.test"]
        _wait(lambda: _listening(host.address, mx), "the lab MX host", log)
        assert "lab time 600x" in log.read_text()

        sent = subprocess.run([sys.executable, "-m", "cli.main", "--config", str(conf), "lab", "send", "accepts"],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert sent.returncode == 0, (sent.stdout, sent.stderr)
        m = re.search(r"queued as ([0-9A-F]{18})", sent.stdout)
        assert m, sent.stdout
        store = base / "run" / "lab" / host.name

        def stored() -> bool:
            found = [p.read_bytes() for p in store.glob("*.eml")] if store.is_dir() else []
            return any(f"X-Lab-Envelope-To: <{accepts.recipient}>".encode() in b for b in found)

        _wait(stored, "the message at the lab MX host", log)

        def delivered() -> bool:
            r = subprocess.run([sys.executable, "-m", "cli.main", "--config", str(conf), "trace", m.group(1)],
                               capture_output=True, text=True, cwd=REPO, timeout=60)
            return "delivered" in r.stdout and f"(via {host.address})" in r.stdout

        _wait(delivered, "the trace's delivered event", log)
    finally:
        proc.send_signal(signal.SIGTERM)  # stop `mailroom lab start` by its pid, as Ctrl-C would
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group it leads: what it started
            proc.wait(10)
            raise
    assert proc.returncode is not None
    # Everything it started is gone with it.
    _wait(lambda: not _listening("127.0.0.1", ports["submission"]) and not _listening(host.address, mx),
          "the lab to stop", log, timeout=20)
