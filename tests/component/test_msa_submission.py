"""The MSA in-process with the real MTA listener: TLS and AUTH rules, sender binding, fixes, hand-off.

Each test starts the MSA exactly as `python -m msa` wires it (`msa.server.run`)
on free loopback ports of a throwaway installation, and the MTA's listeners
(`mta.smtpd.run`) as its next hop, unless the test needs a scripted or missing
next hop.  Clients are smtplib and raw sockets.
"""

from __future__ import annotations

import asyncio
import email
import email.utils
import re
import smtplib
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from common import reply as R
from common.models import Event, Message
from common.reply import Reply, SMTPError
from common.smtp import Connections, Handler, MailEnvelope, MailSession
from tests.harness.client import Client, auth_plain, logged_in, submission, submissions
from tests.harness.services import Stack, installation, running
from tests.support.suite import PASSWORD, Installation

pytestmark = pytest.mark.timeout(30)

USERS = (("alice@example.org", "maildir"), ("bob@example.org", "maildir"))
# Addresses alice and bob may also send as.
ALIASES = {"sales@example.org": "alice@example.org", "info@example.org": "bob@example.org"}
TRACE = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]{18})")


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    return installation(tmp_path_factory.mktemp("msa") / "mailroom", users=USERS, aliases=ALIASES)


@pytest.fixture
def stack(inst: Installation) -> Iterator[Stack]:
    with running(inst, "mta", "msa") as s:
        yield s


def queued(inst: Installation, trace: str) -> bytes:
    """The body the MTA queued under `trace` (what the MSA handed over)."""
    db = inst.db()
    try:
        with db.read() as s:
            m = s.get(Message, trace)
            assert m is not None and m.body is not None, f"{trace} is not in the queue"
            return m.body
    finally:
        db.close()


def message_count(inst: Installation) -> int:
    db = inst.db()
    try:
        with db.read() as s:
            return len(s.scalars(select(Message.id)).all())
    finally:
        db.close()


def send(client: smtplib.SMTP, sender: str, rcpts: list[str], body: bytes) -> tuple[int, str]:
    code, text = client.mail(sender)
    assert code == 250, text
    for r in rcpts:
        code, text = client.rcpt(r)
        assert code == 250, (r, text)
    code, reply = client.data(body)
    return code, reply.decode()


# --- the 587 role: STARTTLS first, AUTH only over TLS ---------------------------------


def test_587_offers_starttls_and_auth_only_after_tls(stack: Stack, inst: Installation) -> None:
    c = submission(inst, tls=False)
    try:
        assert c.has_extn("starttls")
        assert not c.has_extn("auth")
        c.starttls()
        c.ehlo("client.test")
        assert c.has_extn("auth") and set(c.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        assert not c.has_extn("starttls")
    finally:
        c.close()


def test_auth_before_starttls_is_refused_with_538(stack: Stack, inst: Installation) -> None:
    c = Client.connect(inst.ports["submission"])
    try:
        assert c.reply().text.startswith("220 ")
        assert "STARTTLS" in c.cmd("EHLO client.test").text
        token = "AGFsaWNlQGV4YW1wbGUub3JnAHg="  # \0alice@example.org\0x
        assert c.cmd(f"AUTH PLAIN {token}").text.startswith("538 5.7.11 ")
        assert c.cmd("AUTH LOGIN").text.startswith("538 5.7.11 ")
        # Still usable: the client may now do what it should have done.
        assert c.cmd("STARTTLS").text.startswith("220 ")
        c.starttls()
        assert "AUTH PLAIN LOGIN" in c.cmd("EHLO client.test").text
    finally:
        c.close()


def test_mail_before_starttls_gets_530(stack: Stack, inst: Installation) -> None:
    c = Client.connect(inst.ports["submission"])
    try:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<alice@example.org>").text.startswith("530 5.7.0 ")
        assert c.cmd("RCPT TO:<alice@example.org>").text.startswith("530 5.7.0 ")
        assert c.cmd("DATA").text.startswith("530 5.7.0 ")
    finally:
        c.close()


def test_mail_without_auth_gets_530_on_both_roles(stack: Stack, inst: Installation) -> None:
    for c in (submission(inst), submissions(inst)):
        try:
            code, text = c.mail("alice@example.org")
            assert (code, text.split()[0]) == (530, b"5.7.0"), text
            code, text = c.rcpt("alice@example.org")
            assert code == 503  # no transaction was started
        finally:
            c.close()


def test_auth_plain_and_login_succeed_over_tls(stack: Stack, inst: Installation) -> None:
    for mechanism in ("PLAIN", "LOGIN"):
        c = submission(inst)
        try:
            c.user, c.password = "alice@example.org", PASSWORD
            code, text = c.auth(mechanism, getattr(c, f"auth_{mechanism.lower()}"))
            assert (code, text.split()[0]) == (235, b"2.7.0"), (mechanism, text)
        finally:
            c.close()


def test_wrong_password_and_unknown_user_get_the_same_reply_in_similar_time(stack: Stack, inst: Installation) -> None:
    # Each attempt from its own client address, so the per-address delay does not
    # grow between them; the fastest of two tries per case evens out a busy machine.
    # (That the password check itself costs the same is tested in tests/unit/test_auth_users.py.)
    cases = {
        "wrong password": ("alice@example.org", "wrong password"),
        "unknown user": ("nobody@example.org", "wrong password"),
        "not an address": ("not-an-address", "wrong password"),
    }
    replies: set[tuple[int, bytes]] = set()
    times: dict[str, float] = {}
    source = 10
    for _ in range(2):
        for case, (user, password) in cases.items():
            source += 1
            c = submission(inst, source=f"127.0.0.{source}")
            try:
                start = time.monotonic()
                replies.add(auth_plain(c, user, password))
                took = time.monotonic() - start
            finally:
                c.close()
            times[case] = min(times.get(case, took), took)
    assert replies == {(535, b"5.7.8 Authentication credentials invalid")}
    assert min(times.values()) >= 0.4, times  # every failure is slowed down
    assert max(times.values()) - min(times.values()) < 0.3, times


# --- the 465 role: implicit TLS with AUTH -------------------------------------------------


def test_465_advertises_auth_and_submits(stack: Stack, inst: Installation) -> None:
    c = submissions(inst)
    try:
        assert c.has_extn("auth") and "PLAIN" in c.esmtp_features["auth"]
        assert not c.has_extn("starttls")
        code, text = c.login("alice@example.org", PASSWORD)
        assert code == 235
        code, reply = send(c, "alice@example.org", ["bob@example.org"], b"Subject: 465\r\n\r\nhi\r\n")
    finally:
        c.close()
    m = TRACE.fullmatch(reply)
    assert code == 250 and m, reply
    assert b"with ESMTPSA id " + m.group(1).encode() in queued(inst, m.group(1))


def test_465_refuses_wrong_credentials(stack: Stack, inst: Installation) -> None:
    c = submissions(inst, source="127.0.0.5")
    try:
        code, text = auth_plain(c, "alice@example.org", "nope")
        assert code == 535 and text.startswith(b"5.7.8"), text
    finally:
        c.close()


# --- sender binding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "code"),
    [
        ("alice@example.org", 250),
        ("ALICE@Example.ORG", 250),
        ("alice+lists@example.org", 250),  # her address with a tag (recipient_delimiter)
        ("sales@example.org", 250),  # an alias that leads to alice
        ("bob@example.org", 553),  # another user
        ("info@example.org", 553),  # bob's alias
        ("alice@elsewhere.test", 553),
        ("bob+alice@example.org", 553),
        ("", 553),  # the null sender is for bounces, not for users
    ],
)
def test_envelope_sender_must_belong_to_the_user(stack: Stack, inst: Installation, sender: str, code: int) -> None:
    c = logged_in(inst)
    try:
        got, text = c.mail(sender or "<>")
        assert got == code, text
        if code == 553:
            assert text.startswith(b"5.7.1 "), text
    finally:
        c.close()


def _data_reply(inst: Installation, header: str, sender: str = "alice@example.org") -> tuple[int, str]:
    c = logged_in(inst)
    try:
        return send(c, sender, ["bob@example.org"], header.encode() + b"Subject: t\r\n\r\nbody\r\n")
    finally:
        c.close()


@pytest.mark.parametrize(
    "header",
    [
        "From: Alice <alice@example.org>\r\n",
        "From: sales@example.org\r\n",
        "From: \"Alice Liddell\" <Alice@Example.org>\r\n",
        "from: alice+lists@example.org\r\nSender: sales@example.org\r\n",
        "",  # no From: nothing is claimed
    ],
)
def test_from_header_of_the_user_is_accepted(stack: Stack, inst: Installation, header: str) -> None:
    code, reply = _data_reply(inst, header)
    assert code == 250, reply


@pytest.mark.parametrize(
    "header",
    [
        "From: bob@example.org\r\n",
        "From: Alice <bob@example.org>\r\n",
        "From: alice@example.org, bob@example.org\r\n",
        "From: alice@example.org\r\nFrom: bob@example.org\r\n",
        "From: info@example.org\r\n",
        "From: alice@example.org\r\n (folded)\r\n bob@example.org\r\n",  # folded: the second line counts
        "From : bob@example.org\r\n",  # obsolete syntax: space before the colon (RFC 5322 4.5)
        "From:\tbob@example.org\r\n",
        "From: <bob@example.org\r\n",  # unparsable: readers may still show bob
        "From: \r\n",
        "From: \"bob@example.org\" <alice@example.org>\r\n",  # a display name that reads as bob
        "From: =?utf-8?q?bob=40example.org?= <alice@example.org>\r\n",  # the same, RFC 2047-encoded
        "From: alice@example.org\r\nSender: bob@example.org\r\n",
    ],
)
def test_from_header_of_someone_else_is_refused_with_550(stack: Stack, inst: Installation, header: str) -> None:
    before = message_count(inst)
    code, reply = _data_reply(inst, header)
    assert code == 550 and reply.startswith("5.7.1 "), (header, reply)
    assert message_count(inst) == before  # the MTA never got it


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ("From: alice@example.org\r\nResent-From: bob@example.org\r\n", "Resent-From"),
        ("Resent-From: Bob <bob@example.org>\r\nFrom: alice@example.org\r\n", "Resent-From"),
        ("From: alice@example.org\r\nResent-From: alice@example.org\r\nResent-Sender: info@example.org\r\n",
         "Resent-Sender"),
        ("From: alice@example.org\r\nRESENT-FROM : bob@example.org\r\n", "Resent-From"),  # any case, obs. space
        ("From: alice@example.org\r\nResent-From: \"bob@example.org\" <alice@example.org>\r\n", "Resent-From"),
    ],
)
def test_resent_from_of_someone_else_is_refused_and_the_session_goes_on(
    stack: Stack, inst: Installation, header: str, field: str
) -> None:
    """A resent message (RFC 5322 3.6.6) names who resent it: the same binding as From:."""
    before = message_count(inst)
    c = logged_in(inst)
    try:
        code, reply = send(c, "alice@example.org", ["bob@example.org"], header.encode() + b"Subject: t\r\n\r\nb\r\n")
        assert code == 550 and reply.startswith(f"5.7.1 {field}: header address not owned by you"), (header, reply)
        assert message_count(inst) == before  # the MTA never got it
        # The same session sends what she may.
        code, reply = send(c, "alice@example.org", ["bob@example.org"],
                           b"From: alice@example.org\r\nResent-From: sales@example.org\r\n"
                           b"Resent-Sender: alice+lists@example.org\r\nSubject: t\r\n\r\nb\r\n")
        assert code == 250, reply
    finally:
        c.close()
    assert message_count(inst) == before + 1


def test_sender_binding_applies_after_a_fresh_login_too(stack: Stack, inst: Installation) -> None:
    c = logged_in(inst, "bob@example.org")
    try:
        assert c.mail("info@example.org")[0] == 250
        c.rset()
        assert c.mail("sales@example.org")[0] == 553
    finally:
        c.close()


# --- RFC 6409 fixes and the Received header --------------------------------------------


def _submit(inst: Installation, body: bytes) -> tuple[str, bytes]:
    c = logged_in(inst)
    try:
        code, reply = send(c, "alice@example.org", ["bob@example.org"], body)
    finally:
        c.close()
    m = TRACE.fullmatch(reply)
    assert code == 250 and m, reply
    return m.group(1), queued(inst, m.group(1))


def test_message_id_and_date_are_added_when_missing(stack: Stack, inst: Installation) -> None:
    trace, body = _submit(inst, b"From: alice@example.org\r\nSubject: bare\r\n\r\nhello\r\n")
    msg = email.message_from_bytes(body)
    assert len(msg.get_all("Message-ID", [])) == 1
    assert re.fullmatch(r"<[^<>@\s]+@mail\.test>", msg["Message-ID"]), msg["Message-ID"]
    assert len(msg.get_all("Date", [])) == 1
    date = email.utils.parsedate_to_datetime(msg["Date"])
    assert abs(time.time() - date.timestamp()) < 60
    assert body.endswith(b"\r\n\r\nhello\r\n")  # the body itself is untouched


def test_message_id_and_date_are_kept_when_present(stack: Stack, inst: Installation) -> None:
    given = (b"Date: Tue, 1 Jan 2030 10:00:00 +0000\r\nmessage-id: <given.1@client.test>\r\n"
             b"From: alice@example.org\r\n\r\nhello\r\n")
    _, body = _submit(inst, given)
    msg = email.message_from_bytes(body)
    assert msg.get_all("Message-ID") == ["<given.1@client.test>"]
    assert msg.get_all("Date") == ["Tue, 1 Jan 2030 10:00:00 +0000"]


def test_received_header_says_esmtpsa_with_the_trace_id(stack: Stack, inst: Installation) -> None:
    trace, body = _submit(inst, b"From: alice@example.org\r\n\r\nhello\r\n")
    received = email.message_from_bytes(body).get_all("Received")
    ours = [r for r in received if "ESMTPSA" in r]
    assert len(ours) == 1, received
    unfolded = re.sub(r"\s+", " ", ours[0])
    assert f"by mail.test (Mailroom) with ESMTPSA id {trace};" in unfolded
    assert "authenticated sender alice@example.org" in unfolded
    assert "from client.test ([127.0.0.1])" in unfolded


# --- the hand-off to the MTA -----------------------------------------------------------


def test_250_carries_the_trace_id_of_the_queued_message(stack: Stack, inst: Installation) -> None:
    trace, body = _submit(inst, b"From: alice@example.org\r\n\r\nhello\r\n")
    db = inst.db()
    try:
        with db.read() as s:
            m = s.get(Message, trace)
            assert m is not None and m.sender == "alice@example.org"
            assert [r.address for r in m.recipients] == ["bob@example.org"]
            events = s.scalars(select(Event).where(Event.trace_id == trace)).all()
    finally:
        db.close()
    assert {(e.hop, e.event) for e in events} >= {("msa", "received"), ("msa", "relayed"), ("mta", "received")}


def test_an_mta_refusal_at_rcpt_is_passed_through(stack: Stack, inst: Installation) -> None:
    c = logged_in(inst)
    try:
        assert c.mail("alice@example.org")[0] == 250
        code, text = c.rcpt("nobody@example.org")
        assert (code, text) == (550, b"5.1.1 Recipient address rejected: user unknown")
        assert c.rcpt("bob@example.org")[0] == 250
        assert c.rcpt("someone@elsewhere.test")[0] == 250  # the internal hop relays anywhere
        code, reply = c.data(b"From: alice@example.org\r\n\r\nhi\r\n")
        assert code == 250 and TRACE.fullmatch(reply.decode()), reply
    finally:
        c.close()


def test_mta_unreachable_gives_451_441(inst: Installation) -> None:
    # Nothing listens on [mta] internal: the MTA is stopped.
    with running(inst, "msa"):
        c = logged_in(inst)
        try:
            assert c.mail("alice@example.org")[0] == 250
            code, text = c.rcpt("bob@example.org")
            assert code == 451 and text.startswith(b"4.4.1 "), text
        finally:
            c.close()


class ScriptedMTA(Handler):
    """A stand-in next hop that answers DATA as a test tells it to."""

    ehlo_keywords = ("XTRACE",)

    def __init__(self, script: dict[str, object]) -> None:
        self.script = script

    async def mail(self, session: MailSession, envelope: MailEnvelope, sender: str) -> Reply:
        self.script["xtrace"] = envelope.params.get("XTRACE")
        self.script["sessions"] = int(self.script.get("sessions", 0)) + 1  # type: ignore[call-overload]
        refusal = self.script.get("mail_reply")
        if isinstance(refusal, Reply):
            raise SMTPError(refusal)
        return R.SENDER_OK

    async def rcpt(self, session: MailSession, envelope: MailEnvelope, recipient: str) -> Reply:
        if recipient == self.script.get("hang_up_at"):
            raise ConnectionResetError("scripted hang-up")
        return R.RECIPIENT_OK

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        gate = self.script.get("gate")
        if isinstance(gate, threading.Event):
            while not gate.is_set():
                await asyncio.sleep(0.02)
        queue_in = self.script.get("queue_then_die")
        if isinstance(queue_in, str):
            # Like an MTA killed right after its commit, before the 250 left.
            with sqlite3.connect(queue_in) as db:
                db.execute("INSERT INTO messages (id, message_id, sender, size, received, client, held, warned,"
                           " is_bounce) VALUES (?, '', '', 0, '2026-01-01', '', 0, 0, 0)", (envelope.params["XTRACE"],))
            raise ConnectionResetError("scripted death after commit")
        if self.script.get("hang_up"):
            raise ConnectionResetError("scripted hang-up")
        reply = self.script["reply"]
        assert isinstance(reply, Reply)
        if not reply.is_ok:
            raise SMTPError(reply)
        return reply


@pytest.fixture
def scripted(inst: Installation) -> Iterator[tuple[Stack, dict[str, object]]]:
    """The MSA, and on the MTA's internal socket a ScriptedMTA instead of the MTA
    (script["connections"] counts the sessions the MSA holds with it)."""
    with running(inst, "msa") as stack:
        connections = Connections()
        script: dict[str, object] = {"connections": connections}
        stack.listen(lambda: ScriptedMTA(script), endpoint=f"unix:{inst.internal_socket}", hostname="mta.test",
                     connections=connections)
        yield stack, script


def test_the_client_hears_250_only_after_the_mta_said_250(scripted: tuple[Stack, dict[str, object]],
                                                            inst: Installation) -> None:
    _, script = scripted
    gate = threading.Event()
    script.update(gate=gate, reply=Reply(250, "2.0.0", "Ok: queued as 0123456789ABCDEF01"))
    c = Client.connect(inst.ports["submission"])
    try:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("STARTTLS")
        c.starttls()
        c.cmd("EHLO client.test")
        assert c.auth_plain("alice@example.org", PASSWORD).code == 235
        assert c.cmd("MAIL FROM:<alice@example.org>").text.startswith("250")
        assert c.cmd("RCPT TO:<bob@example.org>").text.startswith("250")
        assert c.cmd("DATA").text.startswith("354")
        c.send(b"From: alice@example.org\r\n\r\nhi\r\n.\r\n")
        assert c.quiet(0.7)  # the MTA has not answered, so neither may the MSA
        gate.set()
        assert c.reply().text == "250 2.0.0 Ok: queued as 0123456789ABCDEF01"
    finally:
        c.close()
    assert isinstance(script["xtrace"], str) and len(script["xtrace"]) == 18  # the MSA named the trace id


@pytest.mark.parametrize(
    "reply",
    [Reply(452, "4.3.1", "Insufficient system storage"), Reply(554, "5.4.6", "Too many hops, mail loop detected")],
)
def test_an_mta_refusal_after_data_is_passed_through(scripted: tuple[Stack, dict[str, object]],
                                                      inst: Installation, reply: Reply) -> None:
    _, script = scripted
    script["reply"] = reply
    c = logged_in(inst)
    try:
        code, text = send(c, "alice@example.org", ["bob@example.org"], b"From: alice@example.org\r\n\r\nhi\r\n")
    finally:
        c.close()
    assert f"{code} {text}" == str(reply)


def test_mta_lost_during_data_gives_451_441(scripted: tuple[Stack, dict[str, object]], inst: Installation) -> None:
    _, script = scripted
    script["hang_up"] = True
    c = logged_in(inst)
    try:
        code, text = send(c, "alice@example.org", ["bob@example.org"], b"From: alice@example.org\r\n\r\nhi\r\n")
        assert code == 451 and text.startswith("4.4.1 "), text
        assert c.noop()[0] == 250  # the client's session carries on
    finally:
        c.close()


def test_mta_lost_after_queueing_still_gives_250(scripted: tuple[Stack, dict[str, object]], inst: Installation) -> None:
    # The MTA committed the message and died before its 250 reached the MSA: the
    # message is in the shared queue, so a 451 would only make the client send it twice.
    _, script = scripted
    script["queue_then_die"] = str(inst.root / "mailroom.db")
    c = logged_in(inst)
    try:
        code, text = send(c, "alice@example.org", ["bob@example.org"], b"From: alice@example.org\r\n\r\nhi\r\n")
        assert code == 250, text
        assert text == f"2.0.0 Ok: queued as {script['xtrace']}", text
    finally:
        c.close()


def test_a_client_hanging_up_mid_transaction_releases_the_mta_session(
    scripted: tuple[Stack, dict[str, object]], inst: Installation
) -> None:
    connections = scripted[1]["connections"]
    assert isinstance(connections, Connections)
    c = logged_in(inst)
    assert c.mail("alice@example.org")[0] == 250
    assert c.rcpt("bob@example.org")[0] == 250
    assert connections.total == 1  # the MSA holds a session with the MTA
    c.close()  # gone, without QUIT
    deadline = time.monotonic() + 5
    while connections.total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connections.total == 0


def test_mta_lost_between_recipients_fails_the_whole_transaction(
    scripted: tuple[Stack, dict[str, object]], inst: Installation
) -> None:
    # bob was accepted by the session that broke; a new session would carry only the
    # later recipients while the client believes bob is included too.
    _, script = scripted
    script.update(hang_up_at="info@example.org", reply=Reply(250, "2.0.0", "Ok: queued as 0123456789ABCDEF01"))
    c = logged_in(inst)
    try:
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.org")[0] == 250
        code, text = c.rcpt("info@example.org")
        assert code == 451 and text.startswith(b"4.4.1 "), text
        code, text = c.rcpt("alice@example.org")
        assert code == 451 and text.startswith(b"4.4.1 "), text
        code, text = c.data(b"From: alice@example.org\r\n\r\nhi\r\n")
        assert code == 451 and text.startswith(b"4.4.1 "), text
        assert script["sessions"] == 1
        # The next transaction starts afresh.
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.org")[0] == 250
        assert c.data(b"From: alice@example.org\r\n\r\nhi\r\n")[0] == 250
    finally:
        c.close()


@pytest.mark.parametrize(
    "refusal", [Reply(452, "4.3.1", "Insufficient system storage"), Reply(550, "5.7.1", "Sender refused")]
)
def test_an_mta_refusal_at_mail_is_passed_through(scripted: tuple[Stack, dict[str, object]], inst: Installation,
                                                  refusal: Reply) -> None:
    _, script = scripted
    script["mail_reply"] = refusal
    c = logged_in(inst)
    try:
        assert c.mail("alice@example.org")[0] == 250  # the MSA asks the MTA at the first RCPT
        code, text = c.rcpt("bob@example.org")
        assert f"{code} {text.decode()}" == str(refusal)
    finally:
        c.close()
