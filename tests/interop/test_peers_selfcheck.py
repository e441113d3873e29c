"""Self-checks of the real-peer test helpers (tests/support): each peer starts, works, stops.

If one of these fails, the interop tests that build on the helper cannot be trusted,
so read this file's failures first.
"""

from __future__ import annotations

import mailbox
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.peers import MX, mx_thread
from tests.support import dovecot, peers
from tests.support.dovecot import DovecotLMTP
from tests.support.peers import free_port, session_members
from tests.support.postfix import PostfixInstance, smtp_sink, smtp_source

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


def _message(subject: str, body: str = "hello\r\n") -> bytes:
    return f"From: a@sender.test\r\nSubject: {subject}\r\n\r\n{body}".encode()


@pytest.fixture
def aiosmtpd_sink() -> Iterator[MX]:
    with mx_thread(MX()) as sink:
        yield sink


def test_require_fails_with_install_hint() -> None:
    with pytest.raises(pytest.fail.Exception, match="install-peers"):
        peers.require("no-such-peer-program-xyz")
    assert peers.require("postfix").endswith("/postfix")


def test_postfix_virtual_delivery_and_stop(tmp_path: Path) -> None:
    pf = PostfixInstance(tmp_path / "pf", virtual_domains=["example.test"], virtual_mailboxes=["bob@example.test"])
    with pf:
        master = pf._master_pid
        assert master is not None and session_members(master)
        with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
            client.sendmail("a@sender.test", ["bob@example.test"], _message("to bob"))
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("a@sender.test", ["nobody@example.test"], _message("x"))
        pf.wait_queue_empty(10)
        assert pf.maildir_count("bob@example.test") == 1
        assert "status=sent (delivered to maildir)" in pf.log_text()
        assert dovecot.subjects(pf.maildir_path("bob@example.test")) == ["to bob"]
    assert session_members(master) == []


def test_postfix_relays_and_smtp_source(tmp_path: Path, aiosmtpd_sink: MX) -> None:
    sink = aiosmtpd_sink
    relay_to = f"127.0.0.1:{sink.port}"
    with PostfixInstance(tmp_path / "pf", relay_to=relay_to) as pf:
        with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
            client.sendmail("a@sender.test", ["x@far.test"], _message("relayed"))
        pf.wait_queue_empty(10)
        assert [r for g in sink.received for r in g.recipients] == ["x@far.test"]
        run = smtp_source(pf.address, count=200, sessions=10, size=1024, recipient="y@far.test")
        assert run.elapsed > 0
        pf.wait_queue_empty(30)
    assert sum(len(g.recipients) for g in sink.received) == 201


def test_smtp_source_into_virtual_maildir(tmp_path: Path) -> None:
    pf = PostfixInstance(tmp_path / "pf", virtual_domains=["example.test"], virtual_mailboxes=["bob@example.test"])
    with pf:
        smtp_source(pf.address, count=200, sessions=10, size=2048, recipient="bob@example.test")
        pf.wait_queue_empty(30)
        assert pf.maildir_count("bob@example.test") == 200


def test_smtp_sink_accepts_smtp_source() -> None:
    port = free_port()
    with smtp_sink(port) as sink:
        run = smtp_source(f"127.0.0.1:{port}", count=50, sessions=5, reuse_connections=True)
        assert run.process.returncode == 0
        assert sink.poll() is None


def test_doveadm_reads_maildir_and_mbox(tmp_path: Path) -> None:
    maildir = mailbox.Maildir(tmp_path / "Maildir", create=True)
    # str messages: Python's mailbox stores them with LF line ends, as MDAs do.
    maildir.add("Subject: first\n\nbody one\n")
    maildir.add("Subject: =?utf-8?q?caf=C3=A9?=\n\nhello\n")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "Maildir").rglob("*"))
    assert dovecot.message_count(tmp_path / "Maildir") == 2
    assert sorted(dovecot.subjects(tmp_path / "Maildir")) == ["café", "first"]
    assert "=?utf-8?q?caf=C3=A9?=" in dovecot.subjects(tmp_path / "Maildir", decoded=False)
    bodies = {dovecot.fetch_body(tmp_path / "Maildir", n) for n in (1, 2)}
    assert bodies == {"body one\n", "hello\n"}
    # Dovecot worked on a copy: our Maildir gained no index or uidlist files.
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "Maildir").rglob("*")) == before

    mbox_path = tmp_path / "inbox.mbox"
    box = mailbox.mbox(mbox_path, create=True)
    for n in range(3):
        box.add(f"From: a@sender.test\nSubject: mbox {n}\n\nline {n}\n")
    box.close()
    original = mbox_path.read_bytes()
    assert dovecot.message_count(mbox_path) == 3
    assert dovecot.subjects(mbox_path) == ["mbox 0", "mbox 1", "mbox 2"]
    assert dovecot.fetch_body(mbox_path, 3) == "line 2\n"
    assert "Subject: mbox 1" in dovecot.fetch_message(mbox_path, 2)
    assert mbox_path.read_bytes() == original


def test_dovecot_lmtp_accepts_smtplib_lmtp(tmp_path: Path) -> None:
    with DovecotLMTP(tmp_path / "dovecot") as lmtp:
        pid = lmtp.process.pid if lmtp.process else 0
        client = smtplib.LMTP("127.0.0.1", lmtp.port)
        try:
            refused = client.sendmail("a@sender.test", ["Bob@Example.test", "carol@example.test"], _message("via lmtp"))
        finally:
            client.quit()
        assert refused == {}
        assert lmtp.maildir_count("bob@example.test") == 1
        assert lmtp.maildir_count("carol@example.test") == 1
        assert dovecot.subjects(lmtp.maildir("bob@example.test")) == ["via lmtp"]
        # Index and control files live outside the Maildir (Dovecot adds only an
        # empty maildirfolder marker).
        names = {p.name for p in lmtp.maildir("bob@example.test").iterdir()}
        assert names <= {"cur", "new", "tmp", "maildirfolder"}
    assert session_members(pid) == []


def test_postfix_delivers_to_dovecot_lmtp(tmp_path: Path) -> None:
    with (
        DovecotLMTP(tmp_path / "dovecot") as lmtp,
        PostfixInstance(tmp_path / "pf", lmtp_to=lmtp.address, lmtp_domains=["lmtp.test"]) as pf,
    ):
        smtp_source(pf.address, count=20, sessions=4, recipient="dave@lmtp.test")
        pf.wait_queue_empty(20)
        assert lmtp.maildir_count("dave@lmtp.test") == 20


def test_swaks_msmtp_mutt_present() -> None:
    for name in ("swaks", "msmtp", "mutt", "dnsmasq", "doveadm", "smtp-sink"):
        assert Path(peers.require(name)).is_file()
    version = subprocess.run(
        [peers.require("postconf"), "-d", "mail_version"], capture_output=True, text=True, check=True
    )
    assert "mail_version" in version.stdout
