"""`mailroom lab start` as a learner runs it: the command itself starts Mailroom and the lab Internet,
a scenario's message goes through to the lab MX host, and stopping the command (by its pid) stops
everything it started.

The lab installation is made first with the command's own helper, then moved to free loopback
ports (the defaults may be taken by another test run on this machine).
"""

from __future__ import annotations

import datetime as dt
import json
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


def test_lab_create_chooses_the_ports_and_starts_nothing(tmp_path: Path) -> None:
    base = _reachable(tmp_path / "var-lab")
    dns, mx = free_port(udp=True), free_port()
    r = subprocess.run([sys.executable, "-m", "cli.main", "lab", "create", "--dir", str(base), "--warp", "600",
                        "--dns-port", str(dns), "--mx-port", str(mx), "--port-offset", "1000"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    conf = base / "mailroom.toml"
    env = subprocess.run([sys.executable, "-m", "cli.main", "--config", str(conf), "lab", "env"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert env.returncode == 0, env.stderr
    assert f"export LAB_DNS_PORT={dns}\n" in env.stdout and f"export LAB_MX_PORT={mx}\n" in env.stdout
    assert "export LAB_SUBMISSION=127.0.0.1:3587\n" in env.stdout, env.stdout  # 2587 + 1000
    text = conf.read_text()
    assert f'dns = "127.0.0.1:{dns}"' in text and f'nameservers = ["127.0.0.1:{dns}"]' in text
    assert f"remote_port = {mx}" in text and 'listen = "127.0.0.1:9025"' in text
    # Made, not started: no supervisord runs for it (its socket is the proof: another
    # test run may well listen on 3587 itself).
    assert not (base / "run" / "supervisor.sock").exists()
    assert not any((base / "run").glob("*.pid"))
    # A second create, or a port option for a lab that exists, is refused with where to change it.
    again = subprocess.run([sys.executable, "-m", "cli.main", "lab", "create", "--dir", str(base)],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "cli.main", "lab", "start", "--dir", str(base), "--mx-port", "5",
                          "--port-offset", "x"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "--port-offset" in bad.stderr  # argparse: not a number


def _doc_commands() -> list[str]:
    """The dig and swaks commands of docs/lab.md, continuation lines joined."""
    commands: list[str] = []
    lines = (REPO / "docs" / "lab.md").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("$ dig ", "$ swaks ")):
            command = line[2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            commands.append(command)
    return commands


def test_the_docs_commands_use_the_labs_ports_and_the_delay_warning_comes_on_time(tmp_path: Path) -> None:
    commands = _doc_commands()
    assert len(commands) >= 8, commands
    for command in commands:  # no port of a default lab written into a command
        assert not re.search(r"\b(2553|2526|2587)\b", command), command

    base = _reachable(tmp_path / "var-lab")
    ports = {key: free_port() for (_, key) in LISTENERS}
    dns, mx = free_port(udp=True), free_port()
    assert labcmd.create(base, 3600, dns_port=dns, mx_port=mx, listeners=ports) == 0
    conf = base / "mailroom.toml"
    cli = [sys.executable, "-m", "cli.main", "--config", str(conf)]
    added = subprocess.run([*cli, "user", "add", "friend@mailroom.test", "--password-stdin"],
                           input="a second account for swaks\n", capture_output=True, text=True, cwd=REPO, timeout=60)
    assert added.returncode == 0, added.stderr
    log = tmp_path / "lab-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "lab", "start", "--dir", str(base)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        for key in ("submission", "smtp", "lmtp"):
            wait_port(ports[key], timeout=40)
        for host in scenarios.listening_hosts():
            _wait(lambda h=host: _listening(h.address, mx), f"lab MX host {host.name}", log)
        sent = subprocess.run([*cli, "lab", "send", "unreachable"], capture_output=True, text=True, cwd=REPO,
                              timeout=60)
        assert sent.returncode == 0, (sent.stdout, sent.stderr)
        m = re.search(r"queued as ([0-9A-F]{18})", sent.stdout)
        assert m, sent.stdout

        # Each command of the doc, as a learner runs it after `eval "$(mailroom lab env)"`.
        env_line = f'eval "$({" ".join(cli)} lab env)"'
        for command in commands:
            r = subprocess.run(["bash", "-c", f"{env_line} && {command}"], capture_output=True, text=True,
                               cwd=REPO, timeout=60)
            if command.startswith("dig"):
                assert r.returncode == 0 and "timed out" not in r.stdout, (command, r.stdout, r.stderr)
                assert "IN" in r.stdout, (command, r.stdout)
            else:
                server = re.search(r'--server "?([^" ]+)"?', command)
                assert server, command
                assert "=== Connected to 127.0.0." in r.stdout, (command, r.stdout, r.stderr)
                assert re.search(r"<-  220 ", r.stdout), (command, r.stdout)
                if "--auth" in command:
                    assert "<~  235 " in r.stdout and "queued as" in r.stdout, r.stdout

        # The delay warning comes when it is due (4 lab hours), not with an attempt up to an hour later.
        events: list[dict[str, str]] = []

        def warned() -> bool:
            t = subprocess.run([*cli, "trace", m.group(1), "--json"], capture_output=True, text=True, cwd=REPO,
                               timeout=60)
            events[:] = json.loads(t.stdout)["events"] if t.returncode == 0 else []
            return any(e["event"] == "dsn" and e["detail"].startswith("delay warning") for e in events)

        _wait(warned, "the delay warning", log, timeout=60)
        queued = next(dt.datetime.fromisoformat(e["time"]) for e in events if e["event"] == "queued")
        warning = next(dt.datetime.fromisoformat(e["time"]) for e in events if e["event"] == "dsn")
        assert dt.timedelta(hours=4) <= warning - queued < dt.timedelta(hours=4, minutes=30), warning - queued
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
