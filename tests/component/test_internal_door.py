"""The MTA's internal listener takes our MSA and nobody else.

The tester's attack, as uid `nobody`: `swaks --server 127.0.0.1:10025 --from
bob@example.test --to victim@outside.example` relayed to any domain, DKIM-signed
with our keys; 1,000 idle connections from one local process made every MSA
submission fail with 451 4.4.1; `XTRACE=<an existing id>` gave 421 4.3.0 and an
IntegrityError traceback.  Now the hand-off is a Unix socket in the private run
folder (the default `mailroom init` writes), which the kernel keeps from other
users and whose peer's uid the MTA checks (SO_PEERCRED); over TCP, MAIL needs
AUTH with the installation's secret, and a full listener makes a silent
unproven connection give way to the MSA's.  The other uid is a real one: the
tests run `swaks` (Perl) and the system's Python as `nobody` (CI runs as root).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from common import hop_secret
from mta.auth.mailauth import Current
from mta.smtpd import ReceivePolicy, SMTPHandler
from tests.harness.client import Client, logged_in
from tests.harness.services import Stack, installation, running
from tests.support.ports import free_port
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(90)

MESSAGE = b"From: alice@example.org\r\nTo: victim@outside.example\r\nSubject: door\r\n\r\nhi\r\n"
TRACE = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]{18})")
SWAKS = "/usr/bin/swaks"
PERL = "/usr/bin/perl"  # swaks's own interpreter; the test's Python may live under /root, closed to nobody


def as_nobody(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a program as uid nobody, as the tester's local attacker did."""
    assert os.getuid() == 0, "these tests take another uid: they run as root (as CI does)"
    return subprocess.run(args, user="nobody", group="nogroup", extra_groups=[], capture_output=True, text=True,
                          timeout=60, cwd="/")


def swaks(*where: str) -> subprocess.CompletedProcess[str]:
    return as_nobody([SWAKS, *where, "--from", "bob@example.org", "--to", "victim@outside.example",
                      "--helo", "intruder.example", "--timeout", "20"])


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    return installation(tmp_path_factory.mktemp("door") / "mailroom")


@pytest.fixture
def stack(inst: Installation) -> Iterator[Stack]:
    with running(inst, "mta", "msa") as s:
        yield s


def queued_to(stack: Stack, address: str) -> int:
    return sum(address in q.recipients for q in stack.queued())


# --- the Unix socket (the default) ----------------------------------------------------------


def test_init_makes_the_hand_off_a_unix_socket_in_the_private_run_folder(stack: Stack, inst: Installation) -> None:
    path = Path(inst.internal_socket)
    assert path.parent == inst.config.run_dir
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_another_uid_cannot_relay_through_the_internal_socket_and_the_msa_still_works(
    stack: Stack, inst: Installation
) -> None:
    before = queued_to(stack, "victim@outside.example")
    r = swaks("--socket", inst.internal_socket)
    assert r.returncode != 0
    assert "Permission denied" in r.stdout + r.stderr, r.stdout + r.stderr
    assert queued_to(stack, "victim@outside.example") == before
    # Nor can it fill the listener: it cannot open a single connection.
    probe = as_nobody([PERL, "-MIO::Socket::UNIX", "-e",
                       'for (1..50) { print IO::Socket::UNIX->new(Peer => $ARGV[0]) ? "in\n" : "$!\n" }',
                       inst.internal_socket])
    assert probe.stdout.splitlines() == ["Permission denied"] * 50, probe.stdout + probe.stderr
    # Our MSA (the daemons' uid) hands over as before.
    with logged_in(inst) as c:
        assert c.sendmail("alice@example.org", ["victim@outside.example"], MESSAGE) == {}
    assert queued_to(stack, "victim@outside.example") == before + 1


def test_the_peer_uid_is_checked_even_where_the_socket_is_open_to_all(inst: Installation) -> None:
    # The second fence: a socket whose file (or folder) someone opened up.  The kernel
    # says who connected (SO_PEERCRED), and only the daemons' own uid gets in.
    folder = Path(tempfile.mkdtemp(prefix="mailroom-open-"))  # under /tmp: nobody can reach it
    folder.chmod(0o755)
    path = str(folder / "internal.sock")
    stack = Stack(inst)
    try:
        ctx = stack.context()
        policy = ReceivePolicy.from_config(ctx.config, internal=True)
        auth = Current(lambda: ctx.config, ctx.resolver())  # as mta/smtpd.py's run builds it
        stack.listen(partial(SMTPHandler, policy, ctx.db, ctx.clock, auth), endpoint=f"unix:{path}")
        os.chmod(path, 0o666)
        before = queued_to(stack, "victim@outside.example")
        r = swaks("--socket", path)
        assert "554 5.7.1 This listener is for Mailroom's MSA only" in r.stdout, r.stdout + r.stderr
        assert queued_to(stack, "victim@outside.example") == before
        # The daemons' own uid (here the test's: root) is let in and may relay.
        c = Client.session(path)
        try:
            assert c.greeting.code == 220
            assert c.cmd("EHLO msa.test").code == 250
            assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
            assert c.cmd("RCPT TO:<victim@outside.example>").code == 250
        finally:
            c.quit()
    finally:
        stack.close()
        shutil.rmtree(folder, ignore_errors=True)


# --- XTRACE --------------------------------------------------------------------------------------


def test_xtrace_is_checked_and_a_taken_id_gets_a_clean_refusal(
    stack: Stack, inst: Installation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with logged_in(inst) as c:
        assert c.sendmail("alice@example.org", ["bob@example.org"], MESSAGE) == {}
    taken = stack.queued()[-1].trace
    c = Client.session(inst.internal_socket)
    try:
        assert c.cmd("EHLO msa.test").code == 250
        # Malformed: refused at MAIL, the session goes on.
        for bad in ("0123", "0192f3a1b2c3d4e5f6", "0192F3A1B2C3D4E5FG", "\u0660" * 18):
            assert c.cmd(f"MAIL FROM:<alice@example.org> XTRACE={bad}").text.startswith("501 5."), bad
        # Taken: the message is refused, nothing is mixed into the first one, the session goes on.
        assert c.cmd(f"MAIL FROM:<alice@example.org> XTRACE={taken}").code == 250
        assert c.cmd("RCPT TO:<victim@outside.example>").code == 250
        (refused,) = c.data(MESSAGE)
        assert refused.text.startswith("554 5.5.4 XTRACE names a message already queued"), refused
        fresh = "0192F3A1B2C3D4E5F6"
        assert c.cmd(f"MAIL FROM:<alice@example.org> XTRACE={fresh}").code == 250
        assert c.cmd("RCPT TO:<victim@outside.example>").code == 250
        (ok,) = c.data(MESSAGE)
        assert ok.text == f"250 2.0.0 Ok: queued as {fresh}", ok
    finally:
        c.quit()
    first = [q for q in stack.queued() if q.trace == taken]
    assert len(first) == 1 and first[0].recipients == ("bob@example.org",)
    assert not [r for r in caplog.records if "session failed" in r.getMessage() or "IntegrityError" in r.getMessage()]


# --- over TCP: the installation's secret ----------------------------------------------------


@pytest.fixture(scope="module")
def tcp_inst(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    """The internal listener on a loopback port, with small caps (stress mode off, to keep timeouts as set)."""
    port = free_port()
    inst = installation(
        tmp_path_factory.mktemp("door-tcp") / "mailroom",
        mta={"internal": f'"127.0.0.1:{port}"'}, smtp={"max_connections": 6, "stress_threshold": 0},
    )
    inst.ports["internal"] = port
    return inst


def test_over_tcp_another_uid_cannot_relay_without_the_secret(tcp_inst: Installation) -> None:
    with running(tcp_inst, "mta", "msa") as stack:
        port = tcp_inst.ports["internal"]
        r = swaks("--server", f"127.0.0.1:{port}")
        assert "530 5.7.0 Authentication required" in r.stdout, r.stdout + r.stderr
        r = swaks("--server", f"127.0.0.1:{port}", "--auth", "PLAIN", "--auth-user", "msa",
                  "--auth-password", "guessed")
        assert "535 5.7.8" in r.stdout, r.stdout + r.stderr
        assert queued_to(stack, "victim@outside.example") == 0
        # The MSA logs in with the secret it shares with the MTA, and hands over as before.
        with logged_in(tcp_inst) as c:
            assert c.sendmail("alice@example.org", ["victim@outside.example"], MESSAGE) == {}
        assert queued_to(stack, "victim@outside.example") == 1
        assert stat.S_IMODE((tcp_inst.config.run_dir / hop_secret.FILE).stat().st_mode) == 0o600


def test_over_tcp_idle_connections_cannot_keep_the_msa_out(tcp_inst: Installation) -> None:
    with running(tcp_inst, "mta", "msa") as stack:
        port = tcp_inst.ports["internal"]
        before = queued_to(stack, "victim@outside.example")
        # A local process fills the internal listener (6 connections) and stays silent.
        squatters = []
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert s.recv(200).startswith(b"220 ")
            squatters.append(s)
        try:
            with logged_in(tcp_inst) as c:
                # The MSA's connection gets in: the oldest silent one gives way.
                assert c.sendmail("alice@example.org", ["victim@outside.example"], MESSAGE) == {}
            assert squatters[0].recv(200).startswith(b"421 4.7.0")
        finally:
            for s in squatters:
                s.close()
        assert queued_to(stack, "victim@outside.example") == before + 1


def test_the_secret_is_made_once_however_many_ask_at_once(tmp_path: Path) -> None:
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(hop_secret.load(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1 and len(got[0]) == 64
    assert stat.S_IMODE((tmp_path / hop_secret.FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [hop_secret.FILE]  # no temporary file left
    assert hop_secret.matches(got[0], got[0]) and not hop_secret.matches("x" * 64, got[0])
