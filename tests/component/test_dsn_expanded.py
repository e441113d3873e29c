"""DSN "expanded" (RFC 3461 5.2.7, RFC 3464 2.3.3): an alias that hands a message on to several.

A recipient given with NOTIFY=SUCCESS that is an alias (or list) of several
targets gets the sender one success notice with Action: expanded, queued in
the same commit as the message; its targets are queued with NOTIFY minus
SUCCESS (NEVER when nothing is left), so no success notice comes from each
of them.  An alias with one target is forwarding (RFC 3461 5.2.7.2): NOTIFY
goes on as it is, and no "expanded" notice.

Through the MTA's public listener (the real handler on loopback, a real
SQLite file), with smtplib as the sending host.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from sqlalchemy import select

from common.models import Message, Recipient
from tests.harness.mta import MSG, MTA, queued_id
from tests.harness.users import add_alias, add_user
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(30)

SENDER = "someone@far.test"


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    inst = Installation(tmp_path_factory.mktemp("expanded") / "m")
    for user in ("alice", "bob", "carol"):
        add_user(inst, f"{user}@example.org", "maildir")
    inst.set("mta", "resubmission_window", "0")  # the same message is sent more than once here
    add_alias(inst, "team@example.org", "alice@example.org", "bob@example.org", "x@far.test")
    add_alias(inst, "solo@example.org", "carol@example.org")
    return inst


@pytest.fixture
def mta(inst: Installation) -> Iterator[MTA]:
    server = MTA(inst)
    try:
        yield server
    finally:
        server.close()


def send(mta: MTA, rcpts: list[tuple[str, list[str]]], mail_params: tuple[str, ...] = ()) -> str:
    with mta.client() as c:
        assert c.has_extn("dsn")
        assert c.mail(SENDER, list(mail_params))[0] == 250
        for address, params in rcpts:
            code, text = c.rcpt(address, params)
            assert code == 250, (address, text)
        code, text = c.data(MSG)
        assert code == 250, text
    return queued_id(text)


def notices(mta: MTA) -> list[Message]:
    with mta.ctx.db.read() as s:
        return list(s.scalars(select(Message).where(Message.is_bounce.is_(True)).order_by(Message.received)))


def stored(mta: MTA, trace: str) -> dict[str, tuple[str, str, str]]:
    """address -> (original, NOTIFY, ORCPT) as queued."""
    _, rcpts = mta.message(trace)
    return {r.address: (r.original, r.notify, r.orcpt) for r in rcpts}


def parsed(m: Message) -> EmailMessage:
    assert m.body is not None
    msg = email.message_from_bytes(m.body, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_an_alias_of_several_sends_one_expanded_notice_and_its_targets_ask_no_success(mta: MTA) -> None:
    before = len(notices(mta))
    trace = send(mta, [("team@example.org", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Team@example.org"])],
                 ("RET=HDRS", "ENVID=grp-1"))
    assert stored(mta, trace) == {
        a: ("team@example.org", "DELAY", "rfc822;Team@example.org")
        for a in ("alice@example.org", "bob@example.org", "x@far.test")
    }
    new = notices(mta)[before:]
    assert len(new) == 1
    [notice] = new
    assert notice.sender == ""
    with mta.ctx.db.read() as s:
        assert list(s.scalars(select(Recipient.address).where(Recipient.message_id == notice.id))) == [SENDER]
    msg = parsed(notice)
    assert "Successful" in msg["Subject"] and msg.get_content_type() == "multipart/report"
    parts = list(msg.iter_parts())
    assert "hands it on to several recipients" in parts[0].get_content()
    per_message, per_rcpt = parts[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "grp-1"
    assert per_message["X-Mailroom-Trace-ID"] == trace
    assert (per_rcpt["Action"], per_rcpt["Status"]) == ("expanded", "2.0.0")
    assert per_rcpt["Final-Recipient"] == "rfc822; team@example.org"
    assert per_rcpt["Original-Recipient"] == "rfc822; Team@example.org"
    assert parts[2].get_content_type() == "text/rfc822-headers"  # RET=HDRS
    assert "alice" not in msg.as_string() and "bob" not in msg.as_string()  # the list's members stay private


def test_success_alone_leaves_never_an_alias_of_one_is_forwarding_and_nobody_else_gets_a_notice(
    mta: MTA,
) -> None:
    before = len(notices(mta))
    only = send(mta, [("team@example.org", ["NOTIFY=SUCCESS"])])
    assert {v[1] for v in stored(mta, only).values()} == {"NEVER"}
    assert len(notices(mta)) == before + 1

    forwarded = send(mta, [("solo@example.org", ["NOTIFY=SUCCESS"]), ("team@example.org", ["NOTIFY=FAILURE"])])
    assert stored(mta, forwarded) == {
        "carol@example.org": ("solo@example.org", "SUCCESS", ""),  # carol's delivery reports it
        "alice@example.org": ("team@example.org", "FAILURE", ""),
        "bob@example.org": ("team@example.org", "FAILURE", ""),
        "x@far.test": ("team@example.org", "FAILURE", ""),
    }
    assert len(notices(mta)) == before + 1  # neither asked for an "expanded" notice

    plain = send(mta, [("team@example.org", [])])  # no NOTIFY: nothing asked, nothing changed
    assert {v[1] for v in stored(mta, plain).values()} == {""}
    with mta.client() as c:  # the null sender is never sent a notice (RFC 5321 4.5.5)
        assert c.mail("<>")[0] == 250
        assert c.rcpt("team@example.org", ["NOTIFY=SUCCESS"])[0] == 250
        code, text = c.data(MSG)
        assert code == 250, text
    assert {v[1] for v in stored(mta, queued_id(text)).values()} == {"NEVER"}
    assert len(notices(mta)) == before + 1
