"""The MDA with users' Sieve scripts and the spam verdict, over real LMTP, with the real MTA behind it.

The MDA and the MTA's listeners run in the test process (tests/harness/services.py);
no queue manager, so what a script sends (a redirect, a vacation reply) stays in the
queue for the test to read.  Scripts are written where Dovecot's ManageSieve keeps
them (common/users.py), so the MDA reads them exactly as in production.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from common.models import Message, Recipient
from common.users import active_sieve, sieve_dir
from tests.harness.client import Client
from tests.harness.services import Stack, installation
from tests.support.suite import Installation, maildir_messages, mbox_messages

pytestmark = pytest.mark.timeout(120)

ALICE, BOB = "alice@example.org", "bob@example.org"


@pytest.fixture
def inst(tmp_path: Path) -> Installation:
    return installation(tmp_path / "inst", msa={"max_messages_per_hour": 50}, mda={"sieve_max_size": '"2KiB"'})


@pytest.fixture
def stack(inst: Installation) -> Iterator[Stack]:
    s = Stack(inst)
    try:
        s.start_mda()
        s.start_mta()
        yield s
    finally:
        s.close()


def script(inst: Installation, user: str, text: str) -> None:
    """Make `text` the user's active script, laid out as Pigeonhole lays it out."""
    mailbox = _mailbox_name(inst, user)
    folder = sieve_dir(inst.config.mail_root.resolve(), mailbox)
    (folder / "scripts").mkdir(parents=True, exist_ok=True)
    (folder / "scripts" / "main.sieve").write_text(text)
    link = active_sieve(inst.config.mail_root.resolve(), mailbox)
    if not link.is_symlink():
        os.symlink("scripts/main.sieve", link)


def _mailbox_name(inst: Installation, user: str) -> str:
    return str(inst.mailbox(user).resolve().relative_to(inst.config.mail_root.resolve()))


def lmtp(stack: Stack, sender: str, rcpts: list[str], message: bytes) -> list[str]:
    c = Client.session(stack.ports["lmtp"])
    try:
        c.cmd("LHLO test")
        rcpt_replies, data_replies = c.deliver(sender, rcpts, message)
        assert all(r.code == 250 for r in rcpt_replies), rcpt_replies
        return [r.text for r in data_replies]  # the whole reply line: "250 2.0.0 ..."
    finally:
        c.quit()


def msg(subject: str = "hello", *, frm: str = "carol@example.net", to: str = ALICE, extra: str = "",
        body: str = "Hello there.") -> bytes:
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{abs(hash((subject, frm, extra)))}@x>\r\n"
            f"{extra}\r\n{body}\r\n").encode()


def queued(inst: Installation) -> list[tuple[str, str, str, bytes]]:
    """(sender, recipient, original recipient, body) of every queued message."""
    db = inst.db()
    try:
        with db.read() as s:
            rows = s.execute(select(Message.sender, Recipient.address, Recipient.original, Message.body)
                             .join(Recipient, Recipient.message_id == Message.id)).all()
        return [(r[0], r[1], r[2], r[3] or b"") for r in rows]
    finally:
        db.close()


def queued_replies(inst: Installation, count: int, timeout: float = 30.0) -> list[tuple[str, str, str, bytes]]:
    """The queued messages once there are `count` of them: the MDA sends vacation replies
    after its LMTP reply (never holding a delivery up), so they reach the queue a moment later."""
    deadline = time.monotonic() + timeout
    while len(rows := queued(inst)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return rows


SPAM = "X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=9.0 required=6.0 action=add header\r\n"


# --- spam goes to Junk ------------------------------------------------------------------


def test_spam_goes_to_junk_created_and_subscribed(inst: Installation, stack: Stack) -> None:
    replies = lmtp(stack, "spammer@example.net", [ALICE, BOB], msg("win", extra=SPAM))
    assert all(r.startswith("250") for r in replies), replies
    alice = inst.mailbox(ALICE)
    assert maildir_messages(alice) == []
    junk = maildir_messages(alice / ".Junk")
    assert len(junk) == 1 and b"X-Spam-Status: Yes" in junk[0].read_bytes()
    assert (alice / ".Junk" / "maildirfolder").exists()
    assert (alice / "subscriptions").read_text() == "V\t2\n\nJunk\n"
    bob = inst.mailbox(BOB)  # an mbox user: a Junk mbox in the folder beside the inbox
    assert mbox_messages(bob) == []
    assert len(mbox_messages(bob.with_name(bob.name + ".folders") / "Junk")) == 1
    assert (bob.with_name(bob.name + ".folders") / ".subscriptions").read_text() == "V\t2\n\nJunk\n"
    # Ham still goes to the inbox, and the subscription is not written twice.
    lmtp(stack, "carol@example.net", [ALICE], msg("ham"))
    lmtp(stack, "spammer@example.net", [ALICE], msg("win again", extra=SPAM))
    assert len(maildir_messages(alice)) == 1 and len(maildir_messages(alice / ".Junk")) == 2
    assert (alice / "subscriptions").read_text() == "V\t2\n\nJunk\n"


def test_a_verdict_written_by_the_sender_is_removed_by_the_mta(inst: Installation, stack: Stack) -> None:
    """Only our filter's verdict counts: the MTA strips X-Spam-* from what it receives."""
    import smtplib

    with smtplib.SMTP("127.0.0.1", stack.ports["smtp"], timeout=30) as s:
        s.sendmail("carol@example.net", [ALICE], msg("forged verdict", extra=SPAM))
    (_, _, _, body), = queued(inst)
    assert b"X-Spam-Flag" not in body and b"X-Spam-Status" not in body
    assert b"Subject: forged verdict" in body


# --- Sieve actions --------------------------------------------------------------------------


def test_fileinto_with_flags_creates_and_subscribes_the_folder(inst: Installation, stack: Stack) -> None:
    script(inst, ALICE, 'require ["fileinto", "imap4flags", "variables"];\n'
                        'if header :matches "Subject" "[*] *" { fileinto :flags "\\\\Seen" "Lists.${1}"; }\n')
    lmtp(stack, "list@example.net", [ALICE], msg("[mailroom] release"))
    lmtp(stack, "carol@example.net", [ALICE], msg("plain"))
    alice = inst.mailbox(ALICE)
    stored = maildir_messages(alice / ".Lists.mailroom")
    assert len(stored) == 1 and stored[0].parent.name == "cur" and stored[0].name.endswith(":2,S")
    assert len(maildir_messages(alice)) == 1
    assert "Lists\tmailroom" in (alice / "subscriptions").read_text().split("\n")


def test_fileinto_outside_the_mailbox_goes_to_the_inbox(inst: Installation, stack: Stack) -> None:
    script(inst, ALICE, 'require ["fileinto"];\nfileinto "../..";\n')
    replies = lmtp(stack, "carol@example.net", [ALICE], msg("escape"))
    assert replies[0].startswith("250")
    alice = inst.mailbox(ALICE)
    assert len(maildir_messages(alice)) == 1
    root = inst.config.mail_root
    assert sorted(p.name for p in alice.iterdir() if p.name.startswith(".")) == []
    assert not (root / "new").exists() and not (root.parent / "new").exists()


def our_results(inst: Installation, result: str) -> str:
    """An Authentication-Results field as our MTA writes it (under our host name)."""
    return f"Authentication-Results: {inst.config.mailroom.hostname};\r\n {result}\r\n"


@pytest.mark.parametrize("action", ["reject", "ereject"])
def test_reject_is_a_refusal_in_the_lmtp_reply(inst: Installation, stack: Stack, action: str) -> None:
    script(inst, ALICE, f'require ["{action}"];\nif address :is "from" "pest@example.net" '
                        f'{{ {action} "I do not take mail from you."; }}\n')
    # SPF passed for the sender's domain at our MTA: the refusal may become a bounce.
    spf_pass = our_results(inst, "spf=pass (192.0.2.1 for example.net) smtp.mailfrom=pest@example.net; dkim=none")
    c = Client.session(stack.ports["lmtp"])
    try:
        c.cmd("LHLO test")
        _, replies = c.deliver("pest@example.net", [ALICE, BOB], spf_pass.encode() + msg("buy", frm="pest@example.net"))
        assert replies[0].code == 550 and "5.7.1 I do not take mail from you." in replies[0].text
        assert replies[1].code == 250  # the other recipient is not affected
        # The session carries on: the next message is delivered.
        _, replies = c.deliver("carol@example.net", [ALICE], msg("hi"))
        assert replies[0].code == 250
    finally:
        c.quit()
    assert len(maildir_messages(inst.mailbox(ALICE))) == 1
    assert queued(inst) == []  # no message of our own (no backscatter from the MDA)


def test_reject_of_an_unverified_sender_drops_the_message_rather_than_cause_backscatter(
    inst: Installation, stack: Stack,
) -> None:
    script(inst, ALICE, 'require ["reject"];\nif header :contains "subject" "buy" { reject "No."; }\n')
    unverified = [
        b"",  # the checks were off: nothing says who sent it
        our_results(inst, "spf=fail smtp.mailfrom=victim@example.net; dkim=none").encode(),
        # Another host's word, or a pass for some other domain, proves nothing about this sender.
        b"Authentication-Results: elsewhere.example; spf=pass smtp.mailfrom=victim@example.net\r\n",
        our_results(inst, "spf=pass smtp.mailfrom=x@spammer.example; dkim=pass header.d=spammer.example").encode(),
    ]
    for n, top in enumerate(unverified):
        replies = lmtp(stack, "victim@example.net", [ALICE], top + msg(f"buy {n}", frm="victim@example.net"))
        assert replies[0].startswith("250"), replies  # a 550 here would become a bounce to the victim
    assert maildir_messages(inst.mailbox(ALICE)) == [] and queued(inst) == []
    notes = _filter_events(inst)
    assert len([d for d in notes if "dropped, not refused" in d and "<victim@example.net>" in d]) == 4, notes

    # A DKIM signature of the sender's own domain, or a sender of ours: refused, and bounced.
    dkim_pass = our_results(inst, "spf=none smtp.mailfrom=victim@example.net; dkim=pass header.d=example.net")
    replies = lmtp(stack, "victim@example.net", [ALICE], dkim_pass.encode() + msg("buy more"))
    assert replies[0].startswith("550 5.7.1 No."), replies
    replies = lmtp(stack, BOB, [ALICE], msg("buy this", frm=BOB))
    assert replies[0].startswith("550 5.7.1 No."), replies


def test_redirect_goes_through_the_mta_as_forwarding(inst: Installation, stack: Stack) -> None:
    script(inst, ALICE, 'redirect "dave@example.net";\n')
    replies = lmtp(stack, "carol@example.com", [ALICE], msg("pass it on", frm="carol@example.com"))
    assert replies[0].startswith("250")
    assert maildir_messages(inst.mailbox(ALICE)) == []  # not kept without :copy
    (sender, rcpt, original, body), = queued(inst)
    # The user is the original recipient: the queue manager gives it an SRS sender on the way
    # out, as for an alias that forwards; Delivered-To ends a loop at the next pass.
    assert (sender, rcpt, original) == ("carol@example.com", "dave@example.net", ALICE)
    assert body.startswith(b"Received: ") and f"Delivered-To: {ALICE}".encode() in body


def test_redirect_copy_keeps_the_message(inst: Installation, stack: Stack) -> None:
    script(inst, ALICE, 'require "copy";\nredirect :copy "dave@example.net";\n')
    lmtp(stack, "carol@example.com", [ALICE], msg("copy me"))
    assert len(maildir_messages(inst.mailbox(ALICE))) == 1
    assert [q[1] for q in queued(inst)] == ["dave@example.net"]


def test_a_redirect_back_to_an_earlier_recipient_is_kept_not_sent(inst: Installation, stack: Stack) -> None:
    """alice redirects to bob, bob back to alice: bob keeps it; no loop, nothing lost."""
    script(inst, ALICE, f'redirect "{BOB}";\n')
    script(inst, BOB, f'redirect "{ALICE}";\n')
    lmtp(stack, "carol@example.net", [ALICE], msg("ping pong"))
    (sender, rcpt, _, body), = queued(inst)
    assert rcpt == BOB
    # What the queue manager would hand the MDA for bob (the MTA's Received on top).
    lmtp(stack, sender, [BOB], body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert len(mbox_messages(inst.mailbox(BOB))) == 1
    assert len(queued(inst)) == 1  # no second redirect
    assert maildir_messages(inst.mailbox(ALICE)) == []


def test_redirect_while_the_mta_is_down_defers_and_stores_nothing(inst: Installation, tmp_path: Path) -> None:
    script(inst, ALICE, 'require "copy";\nredirect :copy "dave@example.net";\n')
    stack = Stack(inst)
    try:
        stack.start_mda()  # no MTA
        replies = lmtp(stack, "carol@example.com", [ALICE], msg("later"))
        assert replies[0].startswith("451 4.3.0"), replies
        assert maildir_messages(inst.mailbox(ALICE)) == []
        stack.start_mta()
        replies = lmtp(stack, "carol@example.com", [ALICE], msg("later"))
        assert replies[0].startswith("250"), replies
        assert len(maildir_messages(inst.mailbox(ALICE))) == 1 and len(queued(inst)) == 1
    finally:
        stack.close()


def test_redirects_count_against_the_hourly_sending_limit(inst: Installation, stack: Stack) -> None:
    script(inst, ALICE, 'redirect "dave@example.net";\n')
    for i in range(55):
        assert lmtp(stack, "carol@example.com", [ALICE], msg(f"n{i}"))[0].startswith("250")
    assert len(queued(inst)) == 50  # [msa] max_messages_per_hour
    assert len(maildir_messages(inst.mailbox(ALICE))) == 5  # the rest kept, not lost


# --- vacation -----------------------------------------------------------------------------

VACATION = 'require "vacation";\nvacation :days 3 :subject "Away" "I am away until Monday.";\n'


def test_vacation_answers_each_sender_once(inst: Installation, stack: Stack) -> None:
    script(inst, ALICE, VACATION)
    for _ in range(3):
        lmtp(stack, "carol@example.net", [ALICE], msg("are you there?"))
    lmtp(stack, "dave@example.net", [ALICE], msg("and me?", frm="dave@example.net"))
    replies = queued_replies(inst, 2)
    assert sorted(r[1] for r in replies) == ["carol@example.net", "dave@example.net"]
    sender, _, _, body = replies[0]
    assert sender == ""  # RFC 3834 3.3: MAIL FROM:<>
    assert b"Auto-Submitted: auto-replied" in body and b"Subject: Away" in body and b"I am away until Monday." in body
    assert len(maildir_messages(inst.mailbox(ALICE))) == 4  # every message kept


@pytest.mark.parametrize(("sender", "extra", "to"), [
    ("", "", ALICE),  # a bounce
    ("MAILER-DAEMON@example.net", "", ALICE),
    ("list-bounces@example.net", "List-Id: <list.example.net>\r\n", ALICE),
    ("carol@example.net", "Precedence: bulk\r\n", ALICE),
    ("carol@example.net", "Auto-Submitted: auto-replied\r\n", ALICE),
    ("carol@example.net", "", "undisclosed-recipients:;"),  # not written to alice (Bcc)
    ("carol@example.net", SPAM, ALICE),  # spam
])
def test_vacation_never_answers_robots_lists_or_spam(
    inst: Installation, stack: Stack, sender: str, extra: str, to: str
) -> None:
    script(inst, ALICE, VACATION)
    reply = lmtp(stack, sender, [ALICE], msg("x", frm=sender or "x@example.net", to=to, extra=extra))
    assert reply[0].startswith("250")
    # A message that is answered, after it: once its reply is queued, a reply to the
    # first one (sent before it) would be too.
    lmtp(stack, "zed@example.net", [ALICE], msg("answer me", frm="zed@example.net"))
    assert [r[1] for r in queued_replies(inst, 1)] == ["zed@example.net"]


@pytest.mark.timeout(300)
def test_a_vacation_storm_of_a_thousand_senders(inst: Installation, stack: Stack) -> None:
    """1,000 different senders at once: every message is delivered, and the replies stop at
    the user's hourly sending limit (50 here), each sender at most once."""
    script(inst, ALICE, VACATION)
    errors: list[str] = []

    def sender_batch(k: int) -> None:
        c = Client.session(stack.ports["lmtp"], timeout=60)
        try:
            c.cmd("LHLO test")
            for i in range(k * 100, k * 100 + 100):
                frm = f"s{i}@example.net"
                _, replies = c.deliver(frm, [ALICE], msg(f"storm {i}", frm=frm))
                if replies[0].code != 250:
                    errors.append(f"{frm}: {replies[0]}")
        finally:
            c.quit()

    threads = [threading.Thread(target=sender_batch, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(280)
    assert errors == []
    assert len(maildir_messages(inst.mailbox(ALICE))) == 1000
    replies = queued_replies(inst, 50)
    assert len(replies) == 50
    assert len({r[1] for r in replies}) == 50


# --- scripts that cannot run ----------------------------------------------------------------


def _notices(inst: Installation) -> list[Path]:
    subject = b"Subject: Your mail filter has an error"
    return [p for p in maildir_messages(inst.mailbox(ALICE)) if subject in p.read_bytes()]


def test_a_script_that_cannot_be_parsed_loses_no_mail_and_is_reported_once(
    inst: Installation, stack: Stack
) -> None:
    script(inst, ALICE, 'require ["fileinto"];\nif header :contains "subject" "x" { fileinto "X" \n')
    for i in range(3):
        assert lmtp(stack, "carol@example.net", [ALICE], msg(f"m{i}"))[0].startswith("250")
    notices = _notices(inst)
    assert len(notices) == 1 and b"line 3: parsing error" in notices[0].read_bytes()
    assert len(maildir_messages(inst.mailbox(ALICE))) == 4  # three messages and one notice
    trace_details = _filter_events(inst)
    assert any("Sieve script failed" in d for d in trace_details)


def test_a_script_over_the_size_limit_is_not_run(inst: Installation, stack: Stack) -> None:
    big = 'require ["fileinto"];\n' + "# padding\n" * 300 + 'fileinto "Elsewhere";\n'
    assert len(big) > 2048
    script(inst, ALICE, big)
    assert lmtp(stack, "carol@example.net", [ALICE], msg("big script"))[0].startswith("250")
    alice = inst.mailbox(ALICE)
    assert not (alice / ".Elsewhere").exists()
    assert len(maildir_messages(alice)) == 2  # the message and the notice
    assert b"limit of 2048" in _notices(inst)[0].read_bytes()


def _filter_events(inst: Installation) -> list[str]:
    from common.models import Event

    db = inst.db()
    try:
        with db.read() as s:
            return list(s.scalars(select(Event.detail).where(Event.event == "filtered")))
    finally:
        db.close()
