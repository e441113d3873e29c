"""The digest that recognises a resubmitted message ignores only Received fields."""

from __future__ import annotations

from mta.resubmit import digest

MESSAGE = b"From: a@example.org\r\nMessage-ID: <1@x>\r\nSubject: s\r\n\r\nbody\r\nReceived: in the body\r\n"


def test_received_fields_added_by_each_hop_do_not_change_the_digest() -> None:
    hop1 = b"Received: from a ([127.0.0.1])\r\n\tby mail.test with ESMTPSA id 1;\r\n\tTue, 1 Dec 2026\r\n"
    hop2 = b"received: from b\r\n by c; Wed, 2 Dec 2026\r\n"
    assert digest(hop1 + MESSAGE) == digest(MESSAGE) == digest(hop2 + hop1 + MESSAGE)


def test_anything_the_sender_wrote_changes_it() -> None:
    assert digest(MESSAGE) != digest(MESSAGE.replace(b"body", b"bodY"))
    assert digest(MESSAGE) != digest(MESSAGE.replace(b"Subject: s", b"Subject: t"))
    # "Received:" in the body is content, not a trace field.
    assert digest(MESSAGE) != digest(MESSAGE.replace(b"Received: in the body\r\n", b""))
