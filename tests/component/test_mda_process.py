"""The MDA as a real process (`python -m mda`): housekeeping, write errors, concurrency.

These need the daemon itself: its periodic tmp/ sweep, a resource limit that
makes its writes fail for real, and many sessions at once against one process.
"""

from __future__ import annotations

import mailbox
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mda import mbox
from tests.harness.client import Client
from tests.harness.users import add_user
from tests.support.suite import Installation, maildir_messages, mbox_messages, wait_port

ROOT = Path(__file__).resolve().parents[2]


class MDAProcess:
    """`python -m mda --config ...` started by us, stopped by its pid."""

    def __init__(self, inst: Installation, *, file_size_limit: int | None = None) -> None:
        self.inst = inst
        self.log = inst.root / "mda.log"

        def limits() -> None:
            if file_size_limit is not None:
                # A write past the limit fails with EFBIG instead of killing us.
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        inst.give()  # mailboxes the test prepared as root: as if the MDA had written them
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mda", "--config", str(inst.config_path)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=limits,
            )
        try:
            wait_port(inst.ports["lmtp"], timeout=20)
        except TimeoutError:
            self.stop()
            raise AssertionError("the MDA did not start:\n" + self.log.read_text()) from None

    @property
    def port(self) -> int:
        return self.inst.ports["lmtp"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def inst(tmp_path: Path) -> Installation:
    return Installation(tmp_path / "mailroom")


@pytest.fixture
def users(inst: Installation) -> tuple[Path, Path]:
    return add_user(inst, "alice@example.org", "maildir"), add_user(inst, "bob@example.org", "mbox")


@pytest.fixture
def mda(inst: Installation, users: tuple[Path, Path]) -> Iterator[MDAProcess]:
    proc = MDAProcess(inst)
    yield proc
    proc.stop()


@pytest.mark.timeout(30)
def test_the_running_mda_cleans_stale_tmp_files(inst: Installation, users: tuple[Path, Path]) -> None:
    alice, _ = users
    folder = alice / ".Archive"  # a Maildir++ subfolder shares the sweep
    for d in (alice, folder):
        for sub in ("tmp", "new", "cur"):
            (d / sub).mkdir(parents=True, exist_ok=True)
    stale = [alice / "tmp" / "1.M1P1Q1.crashed", folder / "tmp" / "2.M2P2Q2.crashed"]
    fresh = alice / "tmp" / "3.M3P3Q3.writing"
    recent = alice / "tmp" / "4.M4P4Q4.slow"
    kept_new = alice / "new" / "5.M5R5.old-but-delivered"
    for p in (*stale, fresh, recent, kept_new):
        p.write_bytes(b"Subject: x\n\nx\n")
    old = time.time() - 36 * 3600 - 60
    for p in (*stale, kept_new):
        os.utime(p, (old, old))
    almost = time.time() - 35 * 3600
    os.utime(recent, (almost, almost))
    proc = MDAProcess(inst)
    try:
        inst.wait_for(lambda: not any(p.exists() for p in stale), timeout=10, what="tmp/ sweep")
        assert fresh.exists() and recent.exists() and kept_new.exists()
        assert "removed 2 stale file(s)" in proc.log.read_text() + inst.log("mda")  # its own log file
    finally:
        proc.stop()


@pytest.mark.timeout(40)
def test_a_failed_mbox_write_is_truncated_back_and_answered_451(inst: Installation,
                                                               users: tuple[Path, Path]) -> None:
    alice, bob = users
    limit = 4 * 1024 * 1024
    bob.parent.mkdir(parents=True, exist_ok=True)
    # An mbox just under the process's file size limit: the next big message cannot fit.
    first = b"Subject: first\n\n" + b"line of text\n" * ((limit - 3000) // 13)
    bob.write_bytes(mbox.entry(first, "carol@example.net", time.time()))
    before = bob.read_bytes()
    assert limit - len(before) < 3000
    proc = MDAProcess(inst, file_size_limit=limit)
    c = Client.session(proc.port, timeout=15)
    try:
        assert c.cmd("LHLO client.test")[0] == 250
        big = b"Subject: too big for the disk\r\n\r\n" + (b"0123456789" * 60 + b"\r\n") * 10
        _, data = c.deliver("carol@example.net", ["bob@example.org", "alice@example.org"], big)
        assert [code for code, _ in data] == [451, 250], data
        assert "4.3.0" in data[0][1]
        assert bob.read_bytes() == before  # truncated back: no half message
        assert not bob.with_name(bob.name + ".lock").exists()
        _, data = c.deliver("carol@example.net", ["bob@example.org"], b"Subject: small\r\n\r\nfits\r\n")
        assert [code for code, _ in data] == [250]
    finally:
        c.quit()
        proc.stop()
    subjects = [mailbox.mboxMessage(m)["subject"] for m in mbox_messages(bob)]
    assert subjects == ["first", "small"]
    assert len(maildir_messages(alice)) == 1


SESSIONS = 20
PER_SESSION = 50


def _message(n: int) -> bytes:
    return (
        f"Subject: message {n:04d}\r\nMessage-ID: <{n}@test>\r\n\r\n"
        f"From the sender, number {n}.\r\n>From quoted {n}\r\n.dot line\r\n".encode()
        + f"filler {n:04d} ".encode() * 40 + b"\r\n"
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_twenty_sessions_deliver_a_thousand_messages_once_each(mda: MDAProcess, users: tuple[Path, Path]) -> None:
    alice, bob = users
    errors: list[str] = []

    def session(k: int) -> None:
        try:
            c = Client.session(mda.port, timeout=15)
            try:
                assert c.cmd("LHLO client.test")[0] == 250
                for i in range(PER_SESSION):
                    n = k * PER_SESSION + i
                    _, data = c.deliver("carol@example.net", ["alice@example.org", "bob@example.org"], _message(n))
                    if [code for code, _ in data] != [250, 250]:
                        errors.append(f"{n}: {data}")
            finally:
                c.quit()
        except Exception as exc:  # reported below, with the others
            errors.append(f"session {k}: {exc!r}")

    started = time.monotonic()
    threads = [threading.Thread(target=session, args=(k,)) for k in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(110)
    elapsed = time.monotonic() - started
    assert not errors, errors[:5]
    total = SESSIONS * PER_SESSION
    print(f"{total} messages x 2 recipients in {elapsed:.1f} s ({total / elapsed:.0f} messages/s)")

    def expected(n: int, rcpt: str) -> bytes:
        return (f"Return-Path: <carol@example.net>\nDelivered-To: {rcpt}\n".encode()
                + _message(n).replace(b"\r\n", b"\n"))

    maildir_files = maildir_messages(alice)
    assert len(maildir_files) == total
    by_subject = {}
    for p in maildir_files:
        data = p.read_bytes()
        n = int(re.search(rb"Subject: message (\d+)", data).group(1))  # type: ignore[union-attr]
        assert n not in by_subject
        by_subject[n] = data
    assert by_subject == {n: expected(n, "alice@example.org") for n in range(total)}

    # The mbox: exactly `total` From_ lines, each followed by one whole message.
    raw = bob.read_bytes()
    assert raw.count(b"\nFrom carol@example.net ") + raw.startswith(b"From carol@example.net ") == total
    stored = [mbox.unquote(m) for m in mbox_messages(bob)]
    assert len(stored) == total
    numbers = sorted(int(re.search(rb"Subject: message (\d+)", m).group(1)) for m in stored)  # type: ignore[union-attr]
    assert numbers == list(range(total))
    for m in stored:
        n = int(re.search(rb"Subject: message (\d+)", m).group(1))  # type: ignore[union-attr]
        assert m == expected(n, "bob@example.org"), n
