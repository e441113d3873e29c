"""`[mta] processes = 2`: two real MTA processes under supervisord share the public and internal
ports (SO_REUSEPORT), both serve, every message is delivered once, a killed one comes back while
the other serves on, SIGTERM stops both, and one that cannot start stops the suite.

What the kernel says is read from /proc: the listening sockets of a port (/proc/net/tcp) and
the process holding each (/proc/PID/fd).
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from email.parser import BytesParser
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli import supervise
from common import counters, daemon
from tests.support.suite import Installation, free_port, maildir_messages

pytestmark = pytest.mark.timeout(180)

LISTEN = "0A"  # the TCP state LISTEN in /proc/net/tcp


def listening_sockets(port: int) -> set[int]:
    """Inodes of the sockets listening on TCP `port` (IPv4 and IPv6)."""
    found: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == LISTEN and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(f[9]))
    return found


def socket_owners(inodes: set[int]) -> dict[int, set[int]]:
    """pid -> which of these socket inodes it holds open, for every process on the host."""
    owners: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:  # ended meanwhile, or a kernel thread
            continue
        held = {int(m.group(1)) for link in links if (m := re.fullmatch(r"socket:\[(\d+)\]", link))} & inodes
        if held:
            owners[int(entry.name)] = held
    return owners


def listeners(port: int) -> dict[int, set[int]]:
    return socket_owners(listening_sockets(port))


def orphaned(port: int) -> set[int]:
    """Sockets listening on `port` that no live process holds (one still closing)."""
    inodes = listening_sockets(port)
    return inodes - {inode for held in socket_owners(inodes).values() for inode in held}


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped before the open, or between open and read
        return True


def send(inst: Installation, subject: str) -> None:
    """One message from the Internet to alice, on a connection of its own."""
    with smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=30) as c:
        c.sendmail("someone@outside.test", ["alice@example.org"],
                   f"Subject: {subject}\r\nFrom: someone@outside.test\r\n\r\nhello\r\n".encode())


def subjects(inst: Installation) -> list[str]:
    box = inst.mailbox("alice@example.org")
    return sorted(str(BytesParser().parsebytes(p.read_bytes(), headersonly=True)["Subject"])
                  for p in maildir_messages(box))


def accepted_in(path: Path, port: int) -> float:
    return sum(e["value"] for e in counters.read(path) if e["name"] == counters.CONNECTIONS
               and e["labels"] == {"listener": f"127.0.0.1:{port}", "result": "accepted"})


@pytest.fixture
def two(installation: Installation) -> Iterator[Installation]:
    installation.set("mta", "processes", "2")
    # The internal listener on TCP (the MSA then logs in with the installation's secret),
    # so that both processes share it; the Unix socket default is served by one alone.
    installation.ports["internal"] = free_port()
    installation.set("mta", "internal", f'"127.0.0.1:{installation.ports["internal"]}"')
    installation.start()
    try:
        yield installation
    finally:
        installation.stop()


def test_two_processes_listen_on_both_ports_serve_alike_and_deliver_every_message_once(two: Installation) -> None:
    inst = two
    pids = inst.program_pids("mta")
    assert sorted(pids) == ["mta:mta_0", "mta:mta_1"], inst.cli("status").stdout
    # (a) Each process has a listening socket of its own on each port, and nothing else listens there.
    for setting in ("smtp", "internal"):
        held = listeners(inst.ports[setting])
        assert set(held) == set(pids.values()), (setting, held, pids)
        assert all(len(inodes) == 1 for inodes in held.values())
        assert len(set().union(*held.values())) == 2

    n = 40
    for i in range(n):
        send(inst, f"message {i}")
    # (c) Each delivered once.
    inst.wait_for(lambda: len(subjects(inst)) >= n, timeout=60, what="40 deliveries")
    time.sleep(1)  # a duplicate would show up now
    assert subjects(inst) == sorted(f"message {i}" for i in range(n))

    # (b) Both served: the log names each process that queued one.
    queued_by = {int(m.group(1)) for m in re.finditer(r"mta\[(\d+)\] \w+: queued from=<someone@outside.test>",
                                                      inst.log_text())}
    assert queued_by == set(pids.values()), (queued_by, pids)

    # Each process counts its own connections in a file of its own; /metrics sums them.
    metrics = inst.config.run_dir / "metrics"
    port = inst.ports["smtp"]
    files = [metrics / "mta_0.json", metrics / "mta_1.json"]
    # Ours, and the one connection the test harness made to see the port open.
    inst.wait_for(lambda: sum(accepted_in(f, port) for f in files) == n + 1, timeout=30, what="counters saved")
    assert all(accepted_in(f, port) > 0 for f in files)
    assert not (metrics / "mta.json").exists()
    with urllib.request.urlopen(f"http://127.0.0.1:{inst.ports['listen']}/metrics", timeout=10) as r:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    assert samples[("mailroom_connections_total", (("listener", "mta.smtp"), ("result", "accepted")))] == n + 1


def test_a_killed_process_comes_back_while_the_other_serves_and_sigterm_stops_both(two: Installation) -> None:
    inst = two
    before = inst.program_pids("mta")
    killed, survivor = before["mta:mta_1"], before["mta:mta_0"]
    os.kill(killed, signal.SIGKILL)
    inst.wait_for(lambda: gone(killed), timeout=10, what="the killed process to end")
    # A killed process's first thread shows as a zombie while its other threads are still
    # ending and holding its listening socket; a connection the kernel hands that socket
    # then is reset.  So: until no socket listening on the port is left without a process.
    port = inst.ports["smtp"]
    inst.wait_for(lambda: not orphaned(port), timeout=10, what="the killed process's socket to close")
    # (d) The other one serves on: every message of these is taken (none refused or reset).
    for i in range(10):
        send(inst, f"after kill {i}")
    # supervisord starts it again, and it takes its share of the port again.
    inst.wait_for(lambda: len(inst.program_pids("mta")) == 2 and killed not in inst.program_pids("mta").values(),
                  timeout=30, what="supervisord to restart mta_1")
    after = inst.program_pids("mta")
    assert after["mta:mta_0"] == survivor
    inst.wait_for(lambda: set(listeners(inst.ports["smtp"])) == set(after.values()), timeout=10,
                  what="the new process to listen")
    inst.wait_for(lambda: len(subjects(inst)) >= 10, timeout=60, what="10 deliveries")
    assert subjects(inst) == sorted(f"after kill {i}" for i in range(10))

    # `mailroom restart mta` restarts the group of them.
    r = inst.cli("restart", "mta")
    assert r.returncode == 0, r.stdout + r.stderr
    restarted = inst.program_pids("mta")
    assert sorted(restarted) == ["mta:mta_0", "mta:mta_1"]
    assert not set(restarted.values()) & set(after.values())

    # (e) SIGTERM to `mailroom run` stops every process, each cleanly.
    inst.stop()
    assert all(gone(pid) for pid in restarted.values())
    assert listening_sockets(inst.ports["smtp"]) == set()
    log = inst.log_text()
    assert "stopped: mta_0 (exit status 0)" in log and "stopped: mta_1 (exit status 0)" in log


def test_an_mta_process_that_cannot_start_stops_the_suite_with_its_line(installation: Installation) -> None:
    # The real template for two processes, where the MTA's command only says why it cannot
    # start, the way the skeleton does (status 78, after one line on stderr, once it has
    # been up for supervisord's startsecs: common.daemon.cannot_start).
    inst = installation
    inst.set("mta", "processes", "2")
    cfg = inst.config
    conf = supervise.render(cfg)
    line = "mta: cannot start: a line from the test"
    fail = (f"import sys, time; sys.stderr.write('{line}\\n'); sys.stderr.flush(); "
            f"time.sleep({daemon.SUPERVISOR_STARTSECS} + 0.1); sys.exit(78)")
    text = conf.read_text()
    mta_command = f"{sys.executable} -m mta --config {cfg.path} --instance %(process_num)d"
    assert mta_command in text
    conf.write_text(text.replace(mta_command, f"{sys.executable} -c {json.dumps(fail)}"))
    run_dir = cfg.run_dir.resolve()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.watch", "run", str(run_dir), "relay",
         sys.executable, "-m", "cli.supervisord", "-n", "-c", str(conf)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # supervisord stops what it started
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"the suite kept running:\n{out[-3000:]}") from None
    assert proc.returncode == 1, out[-3000:]
    assert err == f"mailroom run: {line}\n"
    assert (run_dir / "stopped").read_text() == "mta\n"


def unix_listener(path: Path) -> int:
    """Inode of the socket listening at Unix path `path` (/proc/net/unix)."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) == 8 and f[7] == str(path):
            return int(f[6])
    raise AssertionError(f"nothing listens at {path}")


def test_a_unix_internal_socket_is_served_by_the_first_process_alone(installation: Installation) -> None:
    # Started the way supervisord starts them (`--instance K`), without supervisord.
    inst = installation
    sock = inst.root / "internal.sock"
    inst.set("mta", "processes", "2")
    inst.set("mta", "internal", f'"unix:{sock}"')
    logs = [inst.root.parent / f"mta_{k}.log" for k in (0, 1)]
    procs = []
    for k, log in enumerate(logs):
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "mta", "--config", str(inst.config_path), "--instance", str(k)],
                stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
                start_new_session=True,
            ))
    try:
        pids = {p.pid for p in procs}
        inst.wait_for(lambda: set(listeners(inst.ports["smtp"])) == pids, timeout=60,
                      what="both processes on the public port")
        assert set(socket_owners({unix_listener(sock)})) == {procs[0].pid}
        with smtplib.SMTP(timeout=30) as c:
            c.sock = socket.socket(socket.AF_UNIX)
            c.sock.connect(str(sock))
            code, text = c.getreply()
            if os.getuid() == 0:
                # Served: and as root the test is not the daemons' user (mailroom), so the
                # process that serves it turns it away by its uid (SO_PEERCRED).
                assert (code, text) == (554, b"5.7.1 This listener is for Mailroom's MSA only"), (code, text)
            else:
                assert code == 220, text
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        statuses = [p.wait(30) for p in procs]
    assert statuses == [0, 0], [log.read_text()[-2000:] for log in logs]
