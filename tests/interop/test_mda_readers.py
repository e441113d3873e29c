"""What the MDA stores, read back by real readers, and the MDA driven by a real LMTP client.

Python's `mailbox` module and Dovecot (doveadm, on a copy of the store) must
find exactly the messages the MDA said 250 for, with the same subjects and
bodies; swaks speaks LMTP to it as an independent client.
"""

from __future__ import annotations

import mailbox
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mda import mbox
from tests.harness.client import Client
from tests.harness.mda import MDA
from tests.harness.users import add_user
from tests.support import dovecot, peers
from tests.support.suite import Installation

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

# (subject as sent, body): the awkward cases for each store.
MESSAGES: list[tuple[str, bytes]] = [
    ("plain", b"Hello.\r\n"),
    ("from lines", b"From the start.\r\n>From quoted once\r\n>>From quoted twice\r\nFromage\r\n From indented\r\n"),
    ("dots", b".\r\n..\r\n.hidden\r\n"),
    ("blank lines at the end", b"text\r\n\r\n\r\n"),
    ("8-bit", "caf\u00e9 \u00fcber \u4e2d\u6587\r\n".encode() + b"raw \xff\xfe\r\n"),
    ("=?utf-8?q?caf=C3=A9_cr=C3=A8me?=", b"encoded subject\r\n"),
    ("empty body", b""),
    ("long lines", (b"x" * 998 + b"\r\n") * 3),
    ("From in the header", b"body\r\n"),
]


def _wire(subject: str, body: bytes, n: int) -> bytes:
    extra = b"X-Note: From here\r\n" if subject == "From in the header" else b""
    return (f"Subject: {subject}\r\nMessage-ID: <{n}@readers.test>\r\nFrom: carol@example.net\r\n".encode()
            + extra + b"\r\n" + body)


def _stored(rcpt: str, wire: bytes) -> bytes:
    """What the MDA promises to store: Return-Path, Delivered-To, then the message with LF."""
    return f"Return-Path: <carol@example.net>\nDelivered-To: {rcpt}\n".encode() + wire.replace(b"\r\n", b"\n")


@pytest.fixture
def delivered(tmp_path: Path) -> Iterator[tuple[Path, Path, list[bytes], list[bytes]]]:
    """Deliver MESSAGES to alice (Maildir) and bob (mbox); yields the stores and what each must hold."""
    inst = Installation(tmp_path / "mailroom")
    alice = add_user(inst, "alice@example.org", "maildir")
    bob = add_user(inst, "bob@example.org", "mbox")
    server = MDA(inst)
    c = Client.session(server.port, timeout=15)
    try:
        assert c.cmd("LHLO client.test")[0] == 250
        for n, (subject, body) in enumerate(MESSAGES):
            _, data = c.deliver("carol@example.net", ["alice@example.org", "bob@example.org"],
                                _wire(subject, body, n))
            assert [code for code, _ in data] == [250, 250], (subject, data)
    finally:
        c.quit()
        server.close()
    wires = [_wire(s, b, n) for n, (s, b) in enumerate(MESSAGES)]
    yield (alice, bob, [_stored("alice@example.org", w) for w in wires],
           [_stored("bob@example.org", w) for w in wires])


def test_python_mailbox_reads_both_stores_byte_for_byte(
    delivered: tuple[Path, Path, list[bytes], list[bytes]],
) -> None:
    alice, bob, want_maildir, want_mbox = delivered
    md = mailbox.Maildir(alice, factory=None, create=False)
    got = sorted(md.get_bytes(key) for key in md.iterkeys())
    assert got == sorted(want_maildir)

    box = mailbox.mbox(bob, create=False)
    try:
        got_mbox = [mbox.unquote(box.get_bytes(key)) for key in box.iterkeys()]
        senders = [box.get_message(key).get_from() for key in box.iterkeys()]
    finally:
        box.close()
    assert got_mbox == want_mbox  # in delivery order, nothing merged or split
    assert all(re.fullmatch(r"carol@example\.net \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", s) for s in senders)


def test_dovecot_agrees_on_counts_subjects_and_bodies(
    delivered: tuple[Path, Path, list[bytes], list[bytes]],
) -> None:
    alice, bob, want_maildir, _ = delivered
    want_subjects = sorted(s.replace("=?utf-8?q?caf=C3=A9_cr=C3=A8me?=", "caf\u00e9 cr\u00e8me") for s, _ in MESSAGES)
    assert dovecot.message_count(alice) == len(MESSAGES)
    assert dovecot.message_count(bob) == len(MESSAGES)
    assert sorted(dovecot.subjects(alice)) == want_subjects
    assert sorted(dovecot.subjects(bob)) == want_subjects
    # Maildir files are the messages themselves: Dovecot's whole text equals what we promised.
    rows = dovecot.fetch(alice, ["hdr.message-id", "text"])
    assert len(rows) == len(MESSAGES)
    by_id = {re.search(rb"Message-ID: (<[^>]+>)", w).group(1).decode(): w for w in want_maildir}  # type: ignore[union-attr]
    for row in rows:
        want = by_id[row["hdr.message-id"]]
        assert row["text"] == want.decode("utf-8", "replace"), row["hdr.message-id"]


def test_dovecot_reads_an_mbox_with_a_null_sender_message(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "mailroom")
    bob = add_user(inst, "bob@example.org", "mbox")
    server = MDA(inst)
    c = Client.session(server.port, timeout=15)
    try:
        c.cmd("LHLO client.test")
        for n, sender in enumerate(["", "carol@example.net", ""]):
            _, data = c.deliver(sender, ["bob@example.org"], f"Subject: bounce {n}\r\n\r\nFrom x\r\n".encode())
            assert data[0][0] == 250
    finally:
        c.quit()
        server.close()
    assert bob.read_bytes().startswith(b"From MAILER-DAEMON ")
    assert sorted(dovecot.subjects(bob)) == ["bounce 0", "bounce 1", "bounce 2"]


def test_swaks_as_an_lmtp_client_gets_one_reply_per_recipient(tmp_path: Path) -> None:
    swaks = peers.require("swaks")
    inst = Installation(tmp_path / "mailroom")
    alice = add_user(inst, "alice@example.org", "maildir")
    bob = add_user(inst, "bob@example.org", "mbox", quota=50)  # too small: refused after DATA
    server = MDA(inst)
    try:
        r = subprocess.run(
            [swaks, "--protocol", "LMTP", "--pipeline", "--server", f"127.0.0.1:{server.port}",
             "--helo", "client.test", "--from", "carol@example.net",
             "--to", "alice@example.org,nobody@example.org,bob@example.org",
             "--header", "Subject: via swaks", "--body", "From swaks, with love\n"],
            capture_output=True, text=True, timeout=30,
        )
    finally:
        server.close()
    out = r.stdout
    assert "250-PIPELINING" in out and "250-ENHANCEDSTATUSCODES" in out, out
    assert re.search(r"^<\*\* +550 5\.1\.1 ", out, re.M), out  # nobody: refused at RCPT
    after_data = out.split("\n -> .\n", 1)[1] if "\n -> .\n" in out else out.split("354", 1)[1]
    replies = re.findall(r"^<[-*]{1,2} +(\d{3} \d\.\d\.\d)", after_data, re.M)
    assert replies[:2] == ["250 2.0.0", "552 5.2.2"], out  # alice, then bob: two replies, in order
    md = mailbox.Maildir(alice, factory=None, create=False)
    (stored,) = [md.get_bytes(k) for k in md.iterkeys()]
    assert stored.startswith(b"Return-Path: <carol@example.net>\nDelivered-To: alice@example.org\n")
    assert b"\nSubject: via swaks\n" in stored and b"\n\nFrom swaks, with love\n" in stored
    assert not bob.exists() or bob.read_bytes() == b""
    assert dovecot.subjects(alice) == ["via swaks"]
