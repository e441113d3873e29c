"""RFC 3464 delivery status notifications, parsed back with Python's email package."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
from email.message import Message

import pytest

from common.reply import Reply
from mta.bounce import Failure, compose

pytestmark = pytest.mark.timeout(10)

ORIGINAL = (
    b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\nTo: bob@far.test\r\nSubject: the plan\r\n"
    b"Message-ID: <plan@example.org>\r\n\r\nSecret body text\r\n"
)
ARRIVAL = dt.datetime(2024, 1, 1, 12, 0, 0)


def _dsn(delayed: bool = False) -> Message:
    raw = compose(
        hostname="mail.test", sender="alice@example.org", trace="0123456789ABCDEF01", original=ORIGINAL,
        failures=[
            Failure("bob@far.test", "bob@far.test", Reply(550, "5.1.1", "No such user here"), "mx.far.test"),
            Failure("carol@example.org", "team@example.org", Reply(451, "4.4.1", "Cannot connect\r\n  to x")),
        ],
        arrival=ARRIVAL, now=ARRIVAL + dt.timedelta(hours=5), delayed=delayed,
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_bounce_is_a_multipart_report_with_three_parts() -> None:
    msg = _dsn()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mail.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert "Undelivered" in msg["Subject"]
    assert msg["Date"] and msg["Message-ID"]
    human, status, headers = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert "<bob@far.test>: 550 5.1.1 No such user here" in text

    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    per_message, bob, carol = blocks
    assert per_message["Reporting-MTA"] == "dns; mail.test"
    assert per_message["Arrival-Date"]
    assert bob["Final-Recipient"] == "rfc822; bob@far.test"
    assert bob["Action"] == "failed" and bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.far.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user here"
    assert bob["Original-Recipient"] is None  # same as final: not repeated
    assert carol["Original-Recipient"] == "rfc822; team@example.org"
    assert carol["Diagnostic-Code"] == "smtp; 451 4.4.1 Cannot connect to x"  # one line

    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_content()
    assert "Subject: the plan" in returned and "Message-ID: <plan@example.org>" in returned
    assert "Secret body text" not in returned  # headers only


def test_delay_warning_says_delayed() -> None:
    msg = _dsn(delayed=True)
    assert "Delayed" in msg["Subject"]
    blocks = msg.get_payload()[1].get_payload()
    assert [b["Action"] for b in blocks[1:]] == ["delayed", "delayed"]
    assert "will be tried again" in msg.get_payload()[0].get_content()
