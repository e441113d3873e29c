"""A BINARYMIME message (RFC 3030 3) crosses the real pipeline with every octet intact.

Every listener that offers BINARYMIME carries it on: the MSA hands it to the
MTA's internal listener with BDAT, the MTA stores it as BINARYMIME, the queue
manager hands it to the MDA over LMTP with BDAT, and the mailbox holds the
body's octets as they were sent (bare CR, bare LF, NUL and all).  DATA after
BODY=BINARYMIME is refused with 503 5.5.1.
"""

from __future__ import annotations

import smtplib

import pytest
from sqlalchemy import select

from common.models import Message
from tests.support.suite import PASSWORD, Installation, maildir_messages, tls_client_context

pytestmark = pytest.mark.timeout(120)

ALICE = "alice@example.org"
PAYLOAD = b"\x00\x01bare\nLF\rCR\r\n.\r\nend\xff" + bytes(range(256))
HEADER = (
    b"From: alice@example.org\r\nTo: alice@example.org\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n"
)


def _submit(suite: Installation, content: bytes, *, data: bool = False) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", suite.ports["submission"], timeout=30) as s:
        s.starttls(context=tls_client_context())
        s.login(ALICE, PASSWORD)
        assert "binarymime" in s.esmtp_features and "chunking" in s.esmtp_features
        assert s.docmd("MAIL", f"FROM:<{ALICE}> BODY=BINARYMIME")[0] == 250
        assert s.docmd("RCPT", f"TO:<{ALICE}>")[0] == 250
        if data:
            return s.docmd("DATA")
        s.send(b"BDAT %d LAST\r\n" % len(content) + content)
        return s.getreply()


def test_a_binary_submission_reaches_the_mailbox_octet_for_octet(suite: Installation) -> None:
    code, text = _submit(suite, HEADER + b"\r\n", data=True)
    assert (code, text[:6]) == (503, b"5.5.1 "), text

    code, text = _submit(suite, HEADER + b"\r\n" + PAYLOAD)
    assert code == 250, text
    box = suite.mailbox(ALICE)
    suite.wait_for(lambda: len(maildir_messages(box)) == 1, what="the binary message delivered")
    stored = maildir_messages(box)[0].read_bytes()
    head, _, body = stored.partition(b"\n\n")
    assert body == PAYLOAD
    assert b"Subject: binary\n" in head and b"Delivered-To: alice@example.org" in head
    db = suite.db()
    try:
        with db.read() as s:
            kinds = s.scalars(select(Message.body_type).where(Message.is_bounce.is_(False))).all()
    finally:
        db.close()
    assert list(kinds) == ["BINARYMIME"]

    # The public listener offers it too, and so does the MDA's LMTP listener.
    with smtplib.SMTP("127.0.0.1", suite.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        assert "binarymime" in s.esmtp_features and "chunking" in s.esmtp_features
    with smtplib.LMTP("127.0.0.1", suite.ports["lmtp"], timeout=30) as lmtp:
        lmtp.ehlo("mta.test")
        assert "binarymime" in lmtp.esmtp_features and "chunking" in lmtp.esmtp_features
