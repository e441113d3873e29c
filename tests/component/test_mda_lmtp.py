"""The MDA's LMTP dialogue (RFC 2033), one in-process listener on a loopback port.

Each test starts the real listener with the real handler on 127.0.0.1:0 with a
throwaway installation (real SQLite file, real mail root) and talks to it over
a plain socket, line by line, so every reply can be checked exactly (the
harness's Stack and Client, tests/harness/).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, select

from common.models import Event, User
from common.smtp import Limits
from tests.harness.client import Client
from tests.harness.mda import MDA
from tests.harness.services import Stack
from tests.harness.users import add_user
from tests.support.suite import Installation, maildir_messages, mbox_messages

pytestmark = pytest.mark.timeout(30)

TRACE = "0192F3A1B2C3D4E5F6"


def events(inst: Installation, trace: str | None = None) -> list[Event]:
    db = inst.db()
    try:
        with db.read() as s:
            q = select(Event).where(Event.hop == "mda").order_by(Event.id)
            if trace:
                q = q.where(Event.trace_id == trace)
            return list(s.scalars(q))
    finally:
        db.close()


@pytest.fixture
def inst(tmp_path: Path) -> Installation:
    inst = Installation(tmp_path / "mailroom")
    inst.set("mda", "lock_timeout", '"0.5s"')
    return inst


@pytest.fixture
def alice(inst: Installation) -> Path:
    return add_user(inst, "alice@example.org", "maildir")


@pytest.fixture
def bob(inst: Installation) -> Path:
    return add_user(inst, "bob@example.org", "mbox")


@pytest.fixture
def mda(inst: Installation, alice: Path, bob: Path) -> Iterator[MDA]:
    server = MDA(inst)
    yield server
    server.close()


@pytest.fixture
def client(mda: MDA) -> Iterator[Client]:
    c = Client.session(mda.port, timeout=15)
    assert c.greeting[0] == 220 and "LMTP" in c.greeting[1]
    assert c.cmd("LHLO client.test")[0] == 250
    yield c
    c.quit()


MESSAGE = b"Subject: hello\r\nFrom: carol@example.net\r\n\r\nHello.\r\n"


# --- the dialogue (pipelining, RSET, a recipient twice: tests/dialogues/lmtp-*.txt) -----------


def test_lhlo_advertises_the_extensions_and_helo_ehlo_are_refused(mda: MDA) -> None:
    c = Client.session(mda.port, timeout=15)
    try:
        for greeting in ("HELO client.test", "EHLO client.test"):
            code, text = c.cmd(greeting)
            assert code == 500 and "5.5.2" in text and "LHLO" in text, text
        assert c.cmd("MAIL FROM:<a@example.net>")[0] == 503  # no LHLO yet
        code, text = c.cmd("LHLO client.test")
        assert code == 250
        keywords = {line[4:].split(" ")[0] for line in text.splitlines()[1:]}
        assert {"PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SIZE"} <= keywords, text
        assert f"SIZE {mda.limits.max_message_size}" in text
        code, text = c.cmd("NOOP")
        assert (code, text[4:9]) == (250, "2.0.0")
    finally:
        c.quit()


def test_size_parameter_over_the_limit_is_refused_at_mail(client: Client, mda: MDA) -> None:
    code, text = client.cmd(f"MAIL FROM:<a@example.net> SIZE={mda.limits.max_message_size + 1}")
    assert code == 552 and "5.3.4" in text
    code, text = client.cmd("MAIL FROM:<a@example.net> SIZE=100 BODY=8BITMIME")
    assert code == 250 and "2.1.0" in text


def test_two_recipients_where_one_fails_get_two_replies(inst: Installation, mda: MDA, client: Client,
                                                         alice: Path) -> None:
    add_user(inst, "full@example.org", "mbox", quota=100)  # too small for any message
    rcpts, data = client.deliver("carol@example.net", ["full@example.org", "alice@example.org"], MESSAGE,
                                 trace=TRACE)
    assert [c for c, _ in rcpts] == [250, 250]
    assert [c for c, _ in data] == [552, 250], data
    assert "5.2.2" in data[0][1]
    assert client.cmd("NOOP")[0] == 250  # nothing left unread: exactly two replies
    assert len(maildir_messages(alice)) == 1
    assert not (inst.config.mail_root / "example.org" / "full.mbox").exists() or mbox_messages(
        inst.config.mail_root / "example.org" / "full.mbox") == []
    got = {(e.recipient, e.event, e.detail[:9]) for e in events(inst, TRACE)}
    assert got == {("full@example.org", "refused", "552 5.2.2"), ("alice@example.org", "delivered", "250 2.0.0")}


def test_too_large_message_gets_one_reply_per_recipient(inst: Installation, alice: Path, bob: Path) -> None:
    server = MDA(inst, Limits(max_message_size=2000))
    c = Client.session(server.port, timeout=15)
    try:
        c.cmd("LHLO client.test")
        _, data = c.deliver("carol@example.net", ["alice@example.org", "bob@example.org", "alice+x@example.org"],
                            MESSAGE + (b"x" * 70 + b"\r\n") * 100)
        assert [code for code, _ in data] == [552, 552, 552], data
        assert all("5.3.4" in t for _, t in data)
        assert c.cmd("NOOP")[0] == 250  # the session carries on, nothing left to read
        # and the next message in the same session is delivered
        _, data = c.deliver("carol@example.net", ["alice@example.org"], MESSAGE)
        assert [code for code, _ in data] == [250]
    finally:
        c.quit()
        server.close()
    assert len(maildir_messages(alice)) == 1 and mbox_messages(bob) == []
    # The trace says why, once per recipient.
    refused = sorted((e.recipient, e.detail[:9]) for e in events(inst) if e.event == "refused")
    assert refused == [("alice+x@example.org", "552 5.3.4"), ("alice@example.org", "552 5.3.4"),
                       ("bob@example.org", "552 5.3.4")]


def test_line_too_long_gets_one_reply_per_recipient(
    client: Client, inst: Installation, alice: Path, bob: Path
) -> None:
    long_line = b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n"
    _, data = client.deliver("carol@example.net", ["alice@example.org", "bob@example.org"], long_line)
    assert [code for code, _ in data] == [500, 500], data
    assert all("5.5.2" in t for _, t in data)
    assert client.cmd("NOOP")[0] == 250
    assert maildir_messages(alice) == [] and mbox_messages(bob) == []
    assert sorted(e.recipient for e in events(inst) if e.event == "refused") == ["alice@example.org", "bob@example.org"]


def test_data_without_an_accepted_recipient_is_503(client: Client, inst: Installation) -> None:
    code, text = client.cmd("DATA")
    assert code == 503 and "5.5.1" in text  # no MAIL
    rcpts, data = client.deliver("carol@example.net", ["nobody@example.org"], MESSAGE)
    assert rcpts[0][0] == 550 and "5.1.1" in rcpts[0][1]
    assert data[0][0] == 503 and "5.5.1" in data[0][1]
    refused = [e for e in events(inst) if e.recipient == "nobody@example.org"]
    assert [(e.event, e.detail[:9]) for e in refused] == [("refused", "550 5.1.1")]


# --- where mail goes: the database, never the address ------------------------------------


def _files_outside(root: Path, mail_root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_relative_to(mail_root)
            and not p.name.startswith("mailroom.db")}


def test_hostile_addresses_never_reach_a_path(inst: Installation, client: Client, tmp_path: Path) -> None:
    mail_root = inst.config.mail_root
    before = _files_outside(tmp_path, mail_root)
    for rcpt in ('"../../etc/x"@example.org', "a/b@example.org", "../alice@example.org",
                 '"alice/../../x"@example.org', "alice@example.org/../x"):
        code, text = client.cmd("MAIL FROM:<carol@example.net>")
        assert code == 250
        code, text = client.cmd(f"RCPT TO:<{rcpt}>")
        assert code in (550, 501) and ("5.1.1" in text or "5.1.3" in text), (rcpt, text)
        client.cmd("RSET")
    for raw in (b"RCPT TO:<al\x00ice@example.org>\r\n", b"RCPT TO:<\"a\rb\"@example.org>\r\n"):
        client.cmd("MAIL FROM:<carol@example.net>")
        client.send(raw)
        code, text = client.reply()
        assert code in (501, 521, 500), (raw, text)
        if code == 521:  # a bare CR closes the session, as it must
            break
        client.cmd("RSET")
    assert _files_outside(tmp_path, mail_root) == before
    assert not Path("/etc/x").exists()
    assert not (mail_root / "example.org" / "a").exists()


def test_a_stored_mailbox_outside_the_root_is_refused(inst: Installation, mda: MDA, tmp_path: Path) -> None:
    add_user(inst, "evil@example.org", "maildir", mailbox="../../escaped")
    add_user(inst, "nul@example.org", "mbox", mailbox="x\x00y")
    add_user(inst, "root@example.org", "maildir", mailbox=".")
    c = Client.session(mda.port, timeout=15)
    try:
        c.cmd("LHLO client.test")
        for rcpt in ("evil@example.org", "nul@example.org", "root@example.org"):
            assert c.cmd("MAIL FROM:<carol@example.net>")[0] == 250
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 550 and "5.1.1" in text, (rcpt, text)
            c.cmd("RSET")
    finally:
        c.quit()
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert not (inst.config.mail_root / "tmp").exists()


def test_the_mailbox_path_comes_from_the_database(inst: Installation, client: Client) -> None:
    # A real user whose address has a '/': `user add` chose a safe folder name.
    add_user(inst, "a/b@example.org", "maildir")
    box = inst.mailbox("a/b@example.org")
    assert box == inst.config.mail_root / "example.org" / "a_b"
    _, data = client.deliver("carol@example.net", ["a/b@example.org"], MESSAGE)
    assert data[0][0] == 250
    assert len(maildir_messages(box)) == 1
    assert not (inst.config.mail_root / "example.org" / "a").exists()


def test_plus_tag_goes_to_the_user_with_the_full_address_in_delivered_to(client: Client, alice: Path) -> None:
    _, data = client.deliver("carol@example.net", ["Alice+News@example.org"], MESSAGE)
    assert data[0][0] == 250
    (stored,) = maildir_messages(alice)
    assert stored.read_bytes().startswith(b"Return-Path: <carol@example.net>\nDelivered-To: Alice+News@example.org\n")


def test_the_delimiter_is_a_setting(inst: Installation, alice: Path) -> None:
    inst.set("mda", "recipient_delimiter", '"-"')
    server = MDA(inst)
    c = Client.session(server.port, timeout=15)
    try:
        c.cmd("LHLO client.test")
        assert c.cmd("MAIL FROM:<carol@example.net>")[0] == 250
        assert c.cmd("RCPT TO:<alice+news@example.org>")[0] == 550
        assert c.cmd("RCPT TO:<alice-news@example.org>")[0] == 250
    finally:
        c.quit()
        server.close()


# --- what is stored ------------------------------------------------------------------------


def test_headers_line_endings_and_bytes(client: Client, alice: Path, bob: Path) -> None:
    body = (b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n.leading dot\r\n..two dots\r\nFrom me\r\n"
            b">From you\r\n8-bit: \xc3\xa9\xff\r\ntrailing  \r\n\r\n")
    _, data = client.deliver("", ["alice@example.org", "bob@example.org"], body)
    assert [c for c, _ in data] == [250, 250]
    expected_lf = body.replace(b"\r\n", b"\n")
    (path,) = maildir_messages(alice)
    assert path.read_bytes() == b"Return-Path: <>\nDelivered-To: alice@example.org\n" + expected_lf
    raw = bob.read_bytes()
    assert raw.startswith(b"From MAILER-DAEMON ")
    first, rest = raw.split(b"\n", 1)
    assert time.strptime(first.decode()[len("From MAILER-DAEMON "):], "%a %b %d %H:%M:%S %Y")
    assert rest == (b"Return-Path: <>\nDelivered-To: bob@example.org\nSubject: =?utf-8?q?caf=C3=A9?=\n\n"
                    b".leading dot\n..two dots\n>From me\n>>From you\n8-bit: \xc3\xa9\xff\ntrailing  \n\n\n")
    assert b"\r" not in raw


def test_delivered_to_for_the_same_recipient_is_a_loop(client: Client, inst: Installation,
                                                        alice: Path, bob: Path) -> None:
    looped = b"Delivered-To: alice@example.org\r\nSubject: loop\r\n\r\nDelivered-To: bob@example.org\r\n"
    _, data = client.deliver("carol@example.net", ["alice@example.org", "bob@example.org"], looped, trace=TRACE)
    assert [c for c, _ in data] == [554, 250], data
    assert "5.4.6" in data[0][1]  # bob's Delivered-To is in the body, not the header: no loop
    assert maildir_messages(alice) == [] and len(mbox_messages(bob)) == 1
    assert [(e.recipient, e.event) for e in events(inst, TRACE)] == [
        ("alice@example.org", "refused"), ("bob@example.org", "delivered")]


def test_events_record_each_delivery_with_its_path(client: Client, inst: Installation,
                                                    alice: Path, bob: Path) -> None:
    _, data = client.deliver("carol@example.net", ["alice@example.org", "bob@example.org"], MESSAGE, trace=TRACE)
    assert [c for c, _ in data] == [250, 250]
    got = {e.recipient: (e.event, e.path, e.detail[:3]) for e in events(inst, TRACE)}
    assert got == {
        "alice@example.org": ("delivered", str(maildir_messages(alice)[0]), "250"),
        "bob@example.org": ("delivered", str(bob), "250"),
    }


def test_redelivery_of_the_same_trace_id_stores_nothing_twice(client: Client, inst: Installation,
                                                               alice: Path, bob: Path) -> None:
    for _ in range(3):
        _, data = client.deliver("carol@example.net", ["alice@example.org", "bob@example.org"], MESSAGE,
                                 trace=TRACE)
        assert [c for c, _ in data] == [250, 250]
    assert len(maildir_messages(alice)) == 1
    assert len(mbox_messages(bob)) == 1
    # The MDA crashed after storing but before recording: the Maildir name and the
    # mbox's journal still find it.
    db = inst.db()
    with db.write() as s:
        for e in s.scalars(select(Event)):
            s.delete(e)
        s.commit()
    db.close()
    _, data = client.deliver("carol@example.net", ["alice@example.org", "bob@example.org"], MESSAGE, trace=TRACE)
    assert [c for c, _ in data] == [250, 250]
    assert len(maildir_messages(alice)) == 1
    assert len(mbox_messages(bob)) == 1
    # A reader moved it to cur/: still one copy.
    (path,) = maildir_messages(alice)
    path.rename(alice / "cur" / (path.name + ":2,S"))
    _, data = client.deliver("carol@example.net", ["alice@example.org"], MESSAGE, trace=TRACE)
    assert len(maildir_messages(alice)) == 1
    # Another message is another file.
    client.deliver("carol@example.net", ["alice@example.org"], MESSAGE, trace="0192F3A1B2C3D4E5F7")
    assert len(maildir_messages(alice)) == 2


# --- quota ---------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["maildir", "mbox"])
def test_quota_refuses_with_552_5_2_2(inst: Installation, mda: MDA, store: str) -> None:
    box = add_user(inst, "q@example.org", store, quota=2500)
    message = b"Subject: q\r\n\r\n" + b"z" * 900 + b"\r\n"  # about 1 KB stored
    c = Client.session(mda.port, timeout=15)
    replies = []
    try:
        c.cmd("LHLO client.test")
        for _ in range(4):
            _, data = c.deliver("carol@example.net", ["q@example.org"], message)
            replies.append(data[0])
    finally:
        c.quit()
    assert [code for code, _ in replies] == [250, 250, 552, 552], replies
    assert "5.2.2" in replies[2][1]
    stored = maildir_messages(box) if store == "maildir" else mbox_messages(box)
    assert len(stored) == 2
    if store == "maildir":
        assert sum(p.stat().st_size for p in stored) <= 2500
        assert (box / "maildirsize").read_text().splitlines()[0] == "2500S"
    else:
        assert box.stat().st_size <= 2500


def test_maildir_quota_notices_mail_removed_by_a_reader(inst: Installation, mda: MDA) -> None:
    box = add_user(inst, "q@example.org", "maildir", quota=2500)
    message = b"Subject: q\r\n\r\n" + b"z" * 900 + b"\r\n"
    c = Client.session(mda.port, timeout=15)
    try:
        c.cmd("LHLO client.test")
        codes = [c.deliver("carol@example.net", ["q@example.org"], message)[1][0][0] for _ in range(3)]
        assert codes == [250, 250, 552]
        # A reader (mutt) deletes both without touching maildirsize.  Once the
        # "over quota" total is older than 15 minutes, it is recounted.
        for p in maildir_messages(box):
            p.unlink()
        old = time.time() - 16 * 60
        os.utime(box / "maildirsize", (old, old))
        # first: still believed full (quota 2500, counted 2 x ~950 + new ~950) -> recount -> fits
        codes = [c.deliver("carol@example.net", ["q@example.org"], message)[1][0][0] for _ in range(2)]
        assert codes == [250, 250]
    finally:
        c.quit()


# --- mbox locking --------------------------------------------------------------------------


def test_a_held_dotlock_gives_451_4_2_0_and_then_delivery(client: Client, bob: Path) -> None:
    bob.parent.mkdir(parents=True, exist_ok=True)
    lock = bob.with_name(bob.name + ".lock")
    lock.write_text("1\n")  # a live process (init): a lock of a dead pid is stale and broken
    started = time.monotonic()
    _, data = client.deliver("carol@example.net", ["bob@example.org"], MESSAGE)
    assert data[0][0] == 451 and "4.2.0" in data[0][1], data
    assert 0.4 < time.monotonic() - started < 5  # waited for mda.lock_timeout (0.5 s)
    assert lock.read_text() == "1\n"  # somebody else's lock is left alone
    lock.unlink()
    _, data = client.deliver("carol@example.net", ["bob@example.org"], MESSAGE)
    assert data[0][0] == 250
    assert len(mbox_messages(bob)) == 1 and not lock.exists()


def test_a_held_fcntl_lock_gives_451_4_2_0(client: Client, bob: Path) -> None:
    bob.parent.mkdir(parents=True, exist_ok=True)
    bob.write_bytes(b"")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(30)", str(bob)],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        _, data = client.deliver("carol@example.net", ["bob@example.org"], MESSAGE)
        assert data[0][0] == 451 and "4.2.0" in data[0][1], data
        assert not bob.with_name(bob.name + ".lock").exists()  # our dotlock was released
    finally:
        holder.kill()
        holder.wait(10)
        assert holder.stdout is not None
        holder.stdout.close()
    _, data = client.deliver("carol@example.net", ["bob@example.org"], MESSAGE)
    assert data[0][0] == 250 and len(mbox_messages(bob)) == 1


def test_a_handler_refusing_the_whole_message_still_gives_one_reply_per_recipient() -> None:
    """RFC 2033 4.2, for any LMTP handler that raises SMTPError from data()."""
    from common import reply as R
    from common.reply import Reply, SMTPError
    from common.smtp import Handler, MailEnvelope, MailSession

    class Refusing(Handler):
        async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply | list[Reply]:
            raise SMTPError(R.LOCAL_ERROR)

    stack = Stack()
    c = Client.session(stack.listen(Refusing, lmtp=True), timeout=15)
    try:
        c.sock.settimeout(3)
        c.cmd("LHLO client.test")
        _, data = c.deliver("carol@example.net", ["a@example.org", "b@example.org", "c@example.org"], MESSAGE)
        assert [code for code, _ in data] == [451, 451, 451]
        assert c.cmd("NOOP")[0] == 250
    finally:
        c.quit()
        stack.close()


# --- look-ups from memory, and outcomes the client records ---------------------------------


def test_users_added_or_moved_while_running_are_seen_at_once(inst: Installation, client: Client) -> None:
    # The MDA answers RCPT from its in-memory copy of the users table: a change
    # must reach it at once, whoever made it (here: a plain write to the table).
    assert client.cmd("MAIL FROM:<carol@example.net>")[0] == 250
    assert client.cmd("RCPT TO:<dave@example.org>")[0] == 550
    client.cmd("RSET")
    dave = add_user(inst, "dave@example.org", "maildir")
    _, data = client.deliver("carol@example.net", ["dave@example.org"], MESSAGE)
    assert [c for c, _ in data] == [250]
    assert len(maildir_messages(dave)) == 1
    db = inst.db()
    try:
        with db.write() as s:
            user = s.scalars(select(User).where(User.address == "dave@example.org")).one()
            user.mailbox = "example.org/dave-moved"
            s.commit()
    finally:
        db.close()
    _, data = client.deliver("carol@example.net", ["dave@example.org"], MESSAGE)
    assert [c for c, _ in data] == [250]
    assert len(maildir_messages(inst.config.mail_root / "example.org/dave-moved")) == 1
    db = inst.db()
    try:
        with db.write() as s:
            s.delete(s.scalars(select(User).where(User.address == "dave@example.org")).one())
            s.commit()
    finally:
        db.close()
    # RCPT answers from the copy in memory (no database read); the delivery reads
    # the generation before it stores, so the removed user gets 550 5.1.1 there.
    moved = inst.config.mail_root / "example.org/dave-moved"
    rcpt, data = client.deliver("carol@example.net", ["dave@example.org"], MESSAGE)
    refusal = data[0] if rcpt[0].code == 250 else rcpt[0]
    assert refusal.code == 550 and "5.1.1" in refusal.text, (rcpt, data)
    assert len(maildir_messages(moved)) == 1
    # Once the copy is current again, RCPT itself refuses.
    assert client.cmd("MAIL FROM:<carol@example.net>")[0] == 250
    assert client.cmd("RCPT TO:<dave@example.org>")[0] == 550


def test_with_xrecord_the_mda_writes_nothing_and_each_250_names_the_path(
    client: Client, inst: Installation, alice: Path, bob: Path
) -> None:
    code, text = client.cmd("LHLO client.test")
    assert "XRECORD" in text
    assert client.cmd(f"MAIL FROM:<carol@example.net> XTRACE={TRACE} XRECORD")[0] == 250
    assert client.cmd("RCPT TO:<alice@example.org>")[0] == 250
    assert client.cmd("RCPT TO:<nobody@example.org>")[0] == 550
    assert client.cmd("RCPT TO:<bob@example.org>")[0] == 250
    data = client.data(MESSAGE, 2)
    assert [c for c, _ in data] == [250, 250]
    (stored,) = maildir_messages(alice)
    assert data[0][1].endswith(f" path={stored}"), data[0]
    assert data[1][1].endswith(f" path={bob}"), data[1]
    # Neither the deliveries nor the refusal: the client records them.
    assert events(inst, TRACE) == []
    # Without XRECORD the MDA records its own events, as before.
    _, data = client.deliver("carol@example.net", ["alice@example.org"], MESSAGE, trace="0192F3A1B2C3D4E5F7")
    assert [c for c, _ in data] == [250] and "path=" not in data[0][1]
    assert [(e.recipient, e.event) for e in events(inst, "0192F3A1B2C3D4E5F7")] == [("alice@example.org", "delivered")]


def test_a_retry_finds_the_copy_a_reader_moved_to_cur(client: Client, inst: Installation, alice: Path) -> None:
    # The queue manager was killed after our 250 and before it recorded it (XRECORD:
    # no event of ours), and a reader has since moved the message to cur/.  The new/
    # name no longer finds it; a retry (XRETRY) makes the MDA look in cur/ too.
    def once(*params: str) -> list[int]:
        assert client.cmd(f"MAIL FROM:<carol@example.net> XTRACE={TRACE} XRECORD {' '.join(params)}")[0] == 250
        assert client.cmd("RCPT TO:<alice@example.org>")[0] == 250
        return [c for c, _ in client.data(MESSAGE, 1)]

    code, text = client.cmd("LHLO client.test")
    assert "XRETRY" in text
    assert once() == [250]
    (path,) = maildir_messages(alice)
    path.rename(alice / "cur" / (path.name + ":2,S"))
    assert events(inst, TRACE) == []  # nothing in the database knows of that delivery
    assert once("XRETRY") == [250]
    assert [p.parent.name for p in maildir_messages(alice)] == ["cur"]


def test_a_first_xrecord_hand_off_reads_no_earlier_deliveries(client: Client, mda: MDA, alice: Path) -> None:
    # The queue manager's first hand-off of a message cannot have reached us before,
    # so the MDA skips its look-up of recorded deliveries; a retry (XRETRY), or a
    # client that does not record outcomes itself, still looks.
    reads: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "FROM events" in statement:
            reads.append(statement)

    engine = mda.ctx.db.read_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        def once(trace: str, params: str) -> None:
            assert client.cmd(f"MAIL FROM:<carol@example.net> XTRACE={trace} {params}".rstrip())[0] == 250
            assert client.cmd("RCPT TO:<alice@example.org>")[0] == 250
            assert [c for c, _ in client.data(MESSAGE, 1)] == [250]

        once(TRACE, "XRECORD")
        assert reads == []
        once(TRACE, "XRECORD XRETRY")
        assert len(reads) == 1
        once("0192F3A1B2C3D4E5F7", "")
        assert len(reads) == 2
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(maildir_messages(alice)) == 2  # the retry stored no second copy
