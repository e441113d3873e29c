"""DSN "expanded" across the whole pipeline: an alias of several, NOTIFY=SUCCESS, one notice.

Alice submits over 587 to team@example.org (an alias for bob and carol)
with NOTIFY=SUCCESS; the four real processes deliver it to both; Alice gets
exactly one notice, Action: expanded, for the alias, and none for bob's or
carol's delivery, since the MTA queued them without SUCCESS (RFC 3461
5.2.7.3).  (Which NOTIFY each target is queued with is tested at the listener
in tests/component/test_dsn_expanded.py.)
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from sqlalchemy import select

from common.models import Message, Recipient
from tests.harness.users import add_user
from tests.support.suite import (
    PASSWORD,
    Installation,
    maildir_messages,
    mbox_messages,
    running,
    tls_client_context,
)

pytestmark = pytest.mark.timeout(120)

BODY = b"Subject: to the team\r\nFrom: alice@example.org\r\nTo: team@example.org\r\n\r\nHello, team.\r\n"


@pytest.fixture
def team(installation: Installation) -> Iterator[Installation]:
    add_user(installation, "carol@example.org", "maildir")
    r = installation.cli("alias", "add", "team@example.org", "bob@example.org", "carol@example.org")
    assert r.returncode == 0, r.stderr
    yield from running(installation)


def test_an_alias_of_two_gets_the_sender_one_expanded_notice_and_no_delivered_ones(team: Installation) -> None:
    with smtplib.SMTP("127.0.0.1", team.ports["submission"], timeout=30) as client:
        client.starttls(context=tls_client_context())
        client.ehlo("client.test")
        client.login("alice@example.org", PASSWORD)
        assert client.mail("alice@example.org", ["ENVID=team-1"])[0] == 250
        code, text = client.rcpt("team@example.org", ["NOTIFY=SUCCESS,FAILURE"])
        assert code == 250, text
        code, text = client.data(BODY)
        assert code == 250, text
    trace = text.decode().rsplit(" ", 1)[1]
    carol, bob = team.mailbox("carol@example.org"), team.mailbox("bob@example.org")
    team.wait_for(lambda: len(maildir_messages(carol)) == 1 and len(mbox_messages(bob)) == 1, what="both deliveries")
    alice = team.mailbox("alice@example.org")
    team.wait_for(lambda: len(maildir_messages(alice)) == 1, what="the expanded notice")

    db = team.db()
    try:
        def states() -> set[str]:
            with db.read() as s:
                return set(s.scalars(select(Recipient.state).where(Recipient.message_id == trace)))

        # The queue manager records a delivery after the MDA's 250, and queues any success
        # notice in that same commit: once both are recorded, such a notice would be queued.
        team.wait_for(lambda: states() == {"delivered"}, what="both deliveries recorded")
        with db.read() as s:
            dsns = list(s.scalars(select(Message.id).where(Message.is_bounce.is_(True))))
    finally:
        db.close()
    assert len(dsns) == 1
    raw = maildir_messages(alice)[0].read_bytes()
    notice = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(notice, EmailMessage)
    assert "Successful" in notice["Subject"] and notice.get_content_type() == "multipart/report"
    per_message, per_rcpt = list(notice.iter_parts())[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "team-1"
    assert (per_rcpt["Action"], per_rcpt["Final-Recipient"]) == ("expanded", "rfc822; team@example.org")
