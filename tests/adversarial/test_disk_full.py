"""Disk full during traffic: clients hear 451 4.3.0 / 452 4.3.1 (never a 250 for mail that
was not stored), nothing accepted is lost, and the queue drains once space returns.

The queue database and the mailboxes live on a small tmpfs mounted by the test
(this needs root, as CI has); a filler file eats the space while a client keeps
sending through the MTA's public listener to the real daemons.
"""

from __future__ import annotations

import os
import pwd
import smtplib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.users import add_user
from tests.support.suite import Installation, maildir_messages, mbox_messages, running

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def inst(tmp_path: Path) -> Installation:
    return Installation(tmp_path / "mailroom")


@pytest.fixture
def small_disk(inst: Installation) -> Iterator[Path]:
    # Inside the installation and the Mailroom user's, as the daemons serve as that user.
    where = inst.root / "disk"
    where.mkdir()
    owner = pwd.getpwnam(inst.config.mailroom.user)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=24m,mode=0700,uid={owner.pw_uid},gid={owner.pw_gid}",
                    "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
        f.flush()
        os.fsync(f.fileno())
    return filler


def pending(inst: Installation) -> int:
    conn = sqlite3.connect(inst.config.database_url.removeprefix("sqlite:///"), timeout=30)
    try:
        return int(conn.execute(
            "SELECT count(*) FROM recipients WHERE state NOT IN ('delivered', 'bounced', 'expired', 'deleted')"
        ).fetchone()[0])
    finally:
        conn.close()


def test_disk_full_during_traffic(inst: Installation, small_disk: Path) -> None:
    inst.set("mailroom", "database", f'"sqlite:///{small_disk}/mailroom.db"')
    inst.set("mailroom", "mail_root", f'"{small_disk}/mail"')
    inst.set("mta", "retry_schedule", '["1s"]')
    inst.set("mta", "poll_interval", '"0.5s"')
    # Below 1 MiB free on the queue's disk, MAIL gets 452 4.3.1 (the 3 MiB left
    # below fill up part-way through the run).
    inst.set("mta", "min_free_disk", '"1m"')
    add_user(inst, "alice@example.org", "maildir")
    add_user(inst, "bob@example.org", "mbox")
    body = b"Subject: %d\r\n\r\n" + (b"z" * 76 + b"\r\n") * 1300  # about 100 KB
    accepted: list[int] = []
    replies: set[tuple[int, str]] = set()
    for suite in running(inst):
        filler = fill(small_disk, leave=3 * 1024 * 1024)
        for n in range(60):
            # A connection per message: refusals count as session errors, and a
            # session with too many of them is closed (max_errors).
            with smtplib.SMTP("127.0.0.1", suite.ports["smtp"], timeout=30) as client:
                client.ehlo("client.example")
                code, text = client.mail("sender@remote.example")
                if code == 250:
                    code, text = client.rcpt("alice@example.org")
                if code == 250:
                    code, text = client.rcpt("bob@example.org")
                if code == 250:
                    code, text = client.docmd("DATA")
                    assert code == 354, text
                    client.send(body.replace(b"%d", str(n).encode()) + b".\r\n")
                    code, text = client.getreply()
            if code == 250:
                accepted.append(n)
            else:
                replies.add((code, text.decode().split(" ", 1)[0]))
        # Refusals were the storage ones, and the disk did fill up part-way.
        assert replies and replies <= {(451, "4.3.0"), (452, "4.3.1")}, replies
        assert 0 < len(accepted) < 60, accepted
        filler.unlink()  # space returns
        suite.wait_for(lambda: pending(inst) == 0, timeout=120, what="the queue to drain")
        # Each accepted message is in each store exactly once: deliveries that failed
        # for space were retried, and a retry never leaves a second copy.
        maildir = [p.read_bytes() for p in maildir_messages(suite.mailbox("alice@example.org"))]
        mbox = mbox_messages(suite.mailbox("bob@example.org"))
        for store, messages in (("maildir", maildir), ("mbox", mbox)):
            stored = sorted(int(m.split(b"Subject: ", 1)[1].split(b"\n", 1)[0]) for m in messages)
            assert set(accepted) <= set(stored), f"{store} lost: {sorted(set(accepted) - set(stored))}"
            assert set(stored) <= set(accepted), f"{store} refused but delivered: {sorted(set(stored) - set(accepted))}"
            assert len(stored) == len(set(stored)), f"{store} duplicates: {stored}"
