"""msa.submission: reading From:/Sender: strictly, and the RFC 6409 fixes on raw bytes."""

from __future__ import annotations

import datetime as dt

import pytest

from common import message
from msa import submission as sub

pytestmark = pytest.mark.timeout(5)

NOW = dt.datetime(2026, 11, 28, 22, 3, 1)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"From: alice@example.org\r\n", ["alice@example.org"]),
        (b"From: Alice <Alice@Example.org>\r\nSender: sales@example.org\r\n",
         ["alice@example.org", "sales@example.org"]),
        (b"FROM : a@x.org\r\n", ["a@x.org"]),
        (b"From: a@x.org,\r\n b@y.org\r\n", ["a@x.org", "b@y.org"]),
        (b"From: \"b@y.org\" <a@x.org>\r\n", ["a@x.org", "b@y.org"]),
        (b"From: =?utf-8?q?b=40y.org?= <a@x.org>\r\n", ["a@x.org", "b@y.org"]),
        (b"Subject: no from\r\n", []),
        (b"X-From: b@y.org\r\nFrom: a@x.org\r\n", ["a@x.org"]),
    ],
)
def test_from_addresses(header: bytes, expected: list[str]) -> None:
    assert sub.from_addresses(header) == expected


@pytest.mark.parametrize(
    "header",
    [b"From: \r\n", b"From: Undisclosed:;\r\n", b"From: a@x.org b@y.org\r\n", b"From: @y.org\r\n",
     b"Sender: nobody\r\n"],
)
def test_unreadable_from_is_an_error(header: bytes) -> None:
    with pytest.raises(sub.UnreadableHeader):
        sub.from_addresses(header)


def test_fix_adds_date_message_id_and_received_in_front() -> None:
    content = b"Subject: s\r\n\r\nbody\r\n"
    out = sub.fix(content, hostname="mail.test", received="Received: x\r\n", now=NOW)
    header, blank, body = message.split(out)
    assert out.startswith(b"Received: x\r\n")
    assert message.values(header, "Date") == ["Sat, 28 Nov 2026 22:03:01 +0000"]
    (mid,) = message.values(header, "Message-ID")
    assert mid.startswith("<20261128220301.") and mid.endswith("@mail.test>")
    assert blank + body == b"\r\nbody\r\n"


def test_fix_keeps_what_is_there() -> None:
    content = b"date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-Id: <a@b>\r\n\r\nbody\r\n"
    out = sub.fix(content, hostname="mail.test", received="Received: x\r\n", now=NOW)
    assert out == b"Received: x\r\n" + content


def test_fix_on_a_message_without_header() -> None:
    out = sub.fix(b"\r\njust a body\r\n", hostname="h", received="Received: x\r\n", now=NOW)
    header, blank, body = message.split(out)
    assert message.values(header, "Date") and message.values(header, "Message-ID")
    assert blank + body == b"\r\njust a body\r\n"


def test_received_header() -> None:
    text = sub.received_header(helo="laptop", client_ip="192.0.2.7", hostname="mail.test",
                               user="alice@example.org", trace="0123456789ABCDEF01", now=NOW)
    assert text == (
        "Received: from laptop ([192.0.2.7])\r\n\t(authenticated sender alice@example.org)\r\n"
        "\tby mail.test (Mailroom) with ESMTPSA id 0123456789ABCDEF01;\r\n\tSat, 28 Nov 2026 22:03:01 +0000\r\n"
    )
