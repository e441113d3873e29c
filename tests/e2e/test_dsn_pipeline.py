"""DSN across the whole pipeline: asked at submission, carried MSA -> MTA -> qmgr -> MDA, answered.

Alice submits over 587 with RET=FULL, ENVID, NOTIFY=SUCCESS and ORCPT; the
four real processes deliver it; the queue manager, whose hop is the last
(our MDA), sends her a success notice (RFC 3464, action "delivered") that
lands in her own mailbox.  (Which notice NOTIFY asks for is tested against
scripted next hops in tests/component/test_dsn_delivery.py.)
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from email.message import EmailMessage

import pytest

from tests.support.suite import PASSWORD, Installation, maildir_messages, tls_client_context

pytestmark = pytest.mark.timeout(120)

BODY = b"Subject: tell me\r\nFrom: alice@example.org\r\nTo: bob@example.org\r\n\r\nDid it arrive?\r\n"


def test_a_success_notice_comes_back_through_the_pipeline(suite: Installation) -> None:
    with smtplib.SMTP("127.0.0.1", suite.ports["submission"], timeout=30) as client:
        client.starttls(context=tls_client_context())
        client.ehlo("client.test")
        assert {"dsn", "requiretls"} <= set(client.esmtp_features)
        client.login("alice@example.org", PASSWORD)
        assert client.mail("alice@example.org", ["RET=FULL", "ENVID=ask+2B1"])[0] == 250
        code, text = client.rcpt("bob@example.org", ["NOTIFY=SUCCESS", "ORCPT=rfc822;Robert@example.org"])
        assert code == 250, text
        code, text = client.data(BODY)
        assert code == 250, text
    alice_box = suite.mailbox("alice@example.org")
    suite.wait_for(lambda: len(maildir_messages(alice_box)) == 1, what="the success notice")
    raw = maildir_messages(alice_box)[0].read_bytes()
    notice = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(notice, EmailMessage)
    assert "Successful" in notice["Subject"] and notice.get_content_type() == "multipart/report"
    parts = list(notice.iter_parts())
    per_message, per_rcpt = parts[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "ask+1"
    assert per_rcpt["Action"] == "delivered" and per_rcpt["Status"] == "2.0.0"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.org"
    assert per_rcpt["Original-Recipient"] == "rfc822; Robert@example.org"
    assert parts[2].get_content_type() == "message/rfc822" and b"Did it arrive?" in parts[2].as_bytes()

