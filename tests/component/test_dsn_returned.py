"""What a notice returns of the original message, when the original was binary or asked for TLS.

BINARYMIME (RFC 3030 3): a binary message's octets can only travel with
BDAT, declared BODY=BINARYMIME.  With RET=FULL its bounce returns it whole,
byte for byte, only where the bounce itself is sure to be carried that way:
to a sender in our own domains, whose mail our MDA takes over LMTP with
BINARYMIME.  To anyone else it returns the header only (text/rfc822-headers)
and says why, rather than decode binary octets as text.

REQUIRETLS (RFC 8689 5): RET=FULL is disregarded, and a notice that carries
the original header must itself go with REQUIRETLS unless the header is
redacted.  To a sender in our domains (our MDA, on this host) the header
comes back and the notice is queued with REQUIRETLS.  The way back to a
remote sender need not offer REQUIRETLS, and a bounce should not be lost
for that, so that one is redacted: the Message-ID alone, and it goes by any
path.

The queue manager bounces the originals at real next hops on loopback and
then delivers each bounce: to a scripted LMTP server (our MDA's role) that
offers BINARYMIME, or to a scripted aiosmtpd host (the sender's MX) that
offers neither BINARYMIME nor REQUIRETLS nor STARTTLS.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest

from common.reply import Reply
from common.smtp import MailEnvelope, MailSession
from tests.harness.peers import MX, LMTPScript, lmtp_server, mx_server
from tests.harness.qmgr import BINARY, BODY, IPS, Rig, dns_server, enqueue, port, rig_args, state

__all__ = ["dns_server", "port", "rig_args"]  # the harness's fixtures, used here

pytestmark = pytest.mark.timeout(30)


class KeepingMDA(LMTPScript):
    """Our MDA's part: takes BINARYMIME with BDAT, keeps what each transaction carried."""

    offers_binarymime = True

    def __init__(self) -> None:
        super().__init__({})
        self.got: list[tuple[str, str, bytes]] = []  # (sender, BODY=, content)

    async def data(self, session: MailSession, envelope: MailEnvelope) -> list[Reply]:
        assert envelope.content is not None and envelope.mail_from is not None
        self.got.append((envelope.mail_from, envelope.body_type, envelope.content))
        return await super().data(session, envelope)


def third_part(notice: bytes) -> tuple[bytes, bytes]:
    """The returned part of a multipart/report, as raw octets: (its header, its body).

    Read by hand, not with the email package, which would decode a binary part."""
    parsed = email.message_from_bytes(notice, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage) and parsed.get_content_type() == "multipart/report"
    boundary = parsed.get_boundary()
    assert boundary
    delimiter = b"\r\n--" + boundary.encode()
    parts = notice.split(delimiter)
    assert parts[-1].startswith(b"--"), "the closing delimiter"
    assert len(parts) == 5, len(parts)  # preamble, three parts, the close
    head, _, body = parts[3].removeprefix(b"\r\n").partition(b"\r\n\r\n")
    return head, body


def test_a_binary_message_comes_back_whole_to_a_local_sender_over_bdat(rig_args: Any) -> None:
    async def go() -> None:
        mda = KeepingMDA()
        async with lmtp_server(mda) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            try:
                async with mx_server(IPS["hard"], rig_args[2], MX(mode="hard")):
                    trace = enqueue(rig, {"x@hard.test": ("", "")}, sender="bob@example.org", body=BINARY,
                                    body_type="BINARYMIME", ret="FULL")
                    await rig.run()  # the original bounces (5.6.3: the host has no BINARYMIME)
                    await rig.run()  # the bounce goes to bob, over LMTP
                [dsn] = rig.dsns()
                assert state(rig, trace, "x@hard.test")[0] == "bounced"
                assert dsn.body_type == "BINARYMIME"
                assert state(rig, dsn.id, "bob@example.org")[0] == "delivered"
            finally:
                await rig.close()
        [(sender, body_type, content)] = mda.got
        assert (sender, body_type) == ("", "BINARYMIME")
        head, body = third_part(content)
        assert b"Content-Type: message/rfc822" in head and b"Content-Transfer-Encoding: binary" in head
        assert body == BINARY  # every octet as it was sent: NUL, bare CR and LF, 0xFF
        assert b"Content-Transfer-Encoding: binary" in content.partition(b"\r\n\r\n")[0]

    asyncio.run(go())


def test_a_binary_message_comes_back_as_its_header_to_a_remote_sender_and_the_notice_says_why(
    rig_args: Any,
) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        try:
            async with mx_server(IPS["hard"], rig_args[2], MX(mode="hard")), \
                    mx_server(IPS["sender"], rig_args[2], MX()) as sender_mx:
                trace = enqueue(rig, {"x@hard.test": ("", "")}, body=BINARY, body_type="BINARYMIME", ret="FULL")
                await rig.run()
                await rig.run()  # the bounce goes to alice@sender.test's MX, which has no BINARYMIME
            [dsn] = rig.dsns()
            assert state(rig, trace, "x@hard.test")[0] == "bounced"
            assert dsn.body_type != "BINARYMIME"
            assert state(rig, dsn.id, "alice@sender.test")[0] == "delivered"
        finally:
            await rig.close()
        [got] = sender_mx.received
        assert got.sender == "<>" and got.recipients == ["alice@sender.test"]
        head, body = third_part(got.content)
        assert b"Content-Type: text/rfc822-headers" in head
        original_header = BINARY.partition(b"\r\n\r\n")[0]
        assert body == original_header + b"\r\n"  # the header, none of the binary body
        assert b"\x00" not in got.content and b"\xff" not in got.content
        notice = got.parsed()
        human = list(notice.iter_parts())[0].get_content()
        assert "binary (BINARYMIME)" in human and "only its header" in human

    asyncio.run(go())


def test_a_bounce_of_a_requiretls_message_is_redacted_and_reaches_a_sender_without_tls(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        try:
            async with mx_server(IPS["ok"], rig_args[2], MX()) as ok, \
                    mx_server(IPS["sender"], rig_args[2], MX()) as sender_mx:
                trace = enqueue(rig, {"a@ok.test": ("", "")}, requiretls=True, ret="FULL", envid="E-1")
                await rig.run()  # no STARTTLS, no REQUIRETLS at ok.test: 5.7.10
                await rig.run()  # the bounce, in the clear, to a host without REQUIRETLS
            s, reply = state(rig, trace, "a@ok.test")
            assert s == "bounced" and reply.startswith("550 5.7.10"), reply
            assert ok.received == []
            [dsn] = rig.dsns()
            assert not dsn.requiretls  # redacted: it may go by any path
            assert state(rig, dsn.id, "alice@sender.test")[0] == "delivered"
        finally:
            await rig.close()
        [got] = sender_mx.received
        assert got.sender == "<>" and not got.tls
        head, body = third_part(got.content)
        assert b"Content-Type: text/rfc822-headers" in head  # not message/rfc822: RET=FULL disregarded
        assert body == b"Message-ID: <p@sender.test>\r\n"
        for secret in (b"Subject: the plan", b"the plan", b"hello", b"From: Alice"):
            assert secret not in got.content, secret
        notice = got.parsed()
        parts = list(notice.iter_parts())
        assert "REQUIRETLS" in parts[0].get_content()
        per_message, per_rcpt = list(parts[1].get_payload())
        assert per_message["Original-Envelope-Id"] == "E-1"
        assert (per_rcpt["Action"], per_rcpt["Status"]) == ("failed", "5.7.10")

    asyncio.run(go())


def test_a_requiretls_message_comes_back_to_a_local_sender_as_its_header_flagged_requiretls(
    rig_args: Any,
) -> None:
    """To our own MDA, on this host: the header may come back, and the notice keeps REQUIRETLS."""

    async def go() -> None:
        mda = KeepingMDA()
        async with lmtp_server(mda) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            try:
                async with mx_server(IPS["hard"], rig_args[2], MX(mode="hard")):
                    enqueue(rig, {"x@hard.test": ("", "")}, sender="bob@example.org", body=BODY, requiretls=True,
                            ret="FULL")
                    await rig.run()
                    await rig.run()
                [dsn] = rig.dsns()
                assert dsn.requiretls
                assert state(rig, dsn.id, "bob@example.org")[0] == "delivered"
            finally:
                await rig.close()
        [(_, _, content)] = mda.got
        head, body = third_part(content)
        assert b"Content-Type: text/rfc822-headers" in head  # RET=FULL disregarded
        assert body == BODY.partition(b"\r\n\r\n")[0] + b"\r\n"
        assert b"hello" not in content

    asyncio.run(go())
