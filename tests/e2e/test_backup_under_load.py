"""A backup taken while mail flows, restored elsewhere, holds every message accepted before it began.

The real suite receives from Postfix's smtp-source (two runs: a Maildir user and an
mbox user) and from a client of our own sending unique messages, while `mailroom
backup` runs.  The backup is restored into a new folder, `mailroom check` finds its
database and mailboxes in agreement, and the restored suite, started on ports of
its own, delivers what was still queued at the snapshot.  Then every message the
original accepted before the backup began is in the restored mailboxes, byte for
byte the file the original stored for it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import smtplib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from cli.storecheck import _index_mbox
from mda.maildir import unique_name
from tests.support import suite as suite_module
from tests.support.postfix import smtp_source
from tests.support.suite import Installation, _reachable, free_port, wait_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]  # a soak: `make soak`

ALICE, BOB = "alice@example.org", "bob@example.org"


def _queue_empty(inst: Installation) -> bool:
    r = inst.cli("queue", "--json")
    return r.returncode == 0 and json.loads(r.stdout) == []


def _adopt(root: Path, log: Path) -> Installation:
    """The restored folder as a test installation, every listener moved to a free port
    (the original still holds its own)."""
    inst = Installation.__new__(Installation)
    inst.root, inst.domain = root, "example.org"
    inst.config_path = root / "mailroom.toml"
    inst.supervisor = None
    inst.log_path = log
    inst.ports = {}
    text = inst.config_path.read_text()
    for key in ("internal", *(key for _, key in suite_module.LISTENERS)):
        port = free_port()
        text, found = re.subn(rf'(?m)^{key} = "127\.0\.0\.1:\d+"', f'{key} = "127.0.0.1:{port}"', text)
        if found:
            inst.ports[key] = port
    inst.config_path.write_text(text)
    return inst


class _Stores:
    """One installation's two mailboxes, read once: a message by (trace id, recipient)."""

    def __init__(self, inst: Installation) -> None:
        self.maildir = inst.mailbox(ALICE)
        self.host = inst.config.mailroom.hostname
        self.mbox = _index_mbox(inst.mailbox(BOB))

    def get(self, trace: str, rcpt: str) -> bytes | None:
        if rcpt == BOB:
            return self.mbox.get((trace, rcpt))
        name = unique_name(trace, rcpt, self.host)
        for p in (self.maildir / "new" / name, *sorted((self.maildir / "cur").glob(name + ":*"))):
            if p.exists():
                return p.read_bytes()
        return None


def test_a_backup_under_load_restores_every_message_accepted_before_it_began(
    suite: Installation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert suite.cli("backup", "init").returncode == 0
    target = f"127.0.0.1:{suite.ports['smtp']}"
    stop = threading.Event()
    ours: list[tuple[float, str, bytes]] = []  # (when the 250 came, trace id, what was sent)
    errors: list[BaseException] = []

    def load(recipient: str, count: int, sessions: int) -> None:
        try:
            while not stop.is_set():
                smtp_source(target, count=count, sessions=sessions, size=2048, sender="load@source.test",
                            recipient=recipient, timeout=300)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def own() -> None:
        n = 0
        try:
            while not stop.is_set():
                n += 1
                rcpt = (ALICE, BOB)[n % 2]
                msg = (f"From: us@source.test\r\nTo: {rcpt}\r\nSubject: ours {n}\r\n"
                       f"Message-ID: <ours-{n}@source.test>\r\n\r\nFrom the test, number {n}.\r\n").encode()
                with smtplib.SMTP("127.0.0.1", suite.ports["smtp"], timeout=30) as c:
                    c.ehlo("source.test")
                    c.mail("us@source.test")
                    c.rcpt(rcpt)
                    code, reply = c.data(msg)
                if code == 250:
                    ours.append((time.time(), reply.decode().rsplit(" ", 1)[-1], msg))
                time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(ALICE, 40, 4)), threading.Thread(target=load, args=(BOB, 20, 2)),
               threading.Thread(target=own)]
    for t in threads:
        t.start()
    try:
        alice_box = suite.mailbox(ALICE)
        suite.wait_for(lambda: len(list((alice_box / "new").glob("*"))) >= 60, timeout=60,
                       what="deliveries before the backup")
        began = time.time()
        backup = suite.cli("backup")
        ended = time.time()
        assert backup.returncode == 0, backup.stdout + backup.stderr
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    assert not errors, errors
    suite.wait_for(lambda: _queue_empty(suite), timeout=120, what="the original's queue to drain")

    db = sqlite3.connect(suite.config.database_url.removeprefix("sqlite:///"))
    cut = dt.datetime.fromtimestamp(began, dt.UTC).replace(tzinfo=None)
    before = db.execute("SELECT m.id, r.address FROM messages m JOIN recipients r ON r.message_id = m.id "
                        "WHERE m.received < ?", (cut.isoformat(sep=" "),)).fetchall()
    during = db.execute("SELECT count(*) FROM messages WHERE received > ? AND received < ?",
                        (cut.isoformat(sep=" "), dt.datetime.fromtimestamp(ended, dt.UTC).replace(tzinfo=None)
                         .isoformat(sep=" "))).fetchone()[0]
    db.close()
    assert len(before) >= 60 and during > 0, (len(before), during)  # mail came in before and during the backup
    our_before = [(trace, msg) for when, trace, msg in ours if when < began]
    assert our_before and {t for t, _ in our_before} <= {t for t, _ in before}

    into = _reachable(tmp_path / "restored")
    r = suite.cli("restore", str(suite.root / "backup"), "--into", str(into), "--key", str(suite.root / "backup.key"))
    assert r.returncode == 0, r.stdout + r.stderr
    restored = _adopt(into, tmp_path / "restored-suite.log")
    checked = restored.cli("check")
    assert checked.returncode == 0, checked.stdout
    assert "the database and the mailboxes agree" in checked.stdout

    # A second suite on a busy shared machine may take longer than the harness's 20 s per port to listen.
    monkeypatch.setattr(suite_module, "wait_port", lambda port, timeout=90.0: wait_port(port, timeout))
    restored.start()  # delivers what was still queued at the snapshot
    try:
        restored.wait_for(lambda: _queue_empty(restored), timeout=120, what="the restored queue to drain")
    finally:
        restored.stop()
    missing, different = [], []
    originals, copies = _Stores(suite), _Stores(restored)
    for trace, rcpt in before:
        original, copy = originals.get(trace, rcpt), copies.get(trace, rcpt)
        assert original is not None, (trace, rcpt)
        if copy is None:
            missing.append((trace, rcpt))
        elif copy != original:
            different.append((trace, rcpt))
    assert not missing and not different, (len(missing), len(different), missing[:3], different[:3])
    print(f"backup under load: {len(before)} deliveries accepted before it began, {during} messages during its "
          f"{ended - began:.1f} s; {len(our_before)} of our own; all restored byte for byte")
    for trace, msg in our_before:  # and these are what was sent, as sent (LF line ends in the mailbox)
        rcpt = ALICE if f"To: {ALICE}".encode() in msg else BOB
        copy = copies.get(trace, rcpt)  # an mbox message comes back unquoted (mboxrd)
        assert copy is not None and copy.endswith(msg.replace(b"\r\n", b"\n")), trace
    assert restored.cli("check").returncode == 0
