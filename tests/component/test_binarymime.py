"""BINARYMIME (RFC 3030 3): a binary message, only ever carried with BDAT.

The engine offers BINARYMIME with CHUNKING where the handler says it keeps
such a message exactly; BODY=BINARYMIME then forbids DATA (503 5.5.1) and the
BDAT octets are kept as they came, bare CR and LF included.  The queue
manager passes a binary message on with BDAT to a next hop that offers
BINARYMIME and CHUNKING, and bounces it with 5.6.3 to one that does not (as
an 8-bit body to a hop without 8BITMIME).  The next hops are real listeners on
loopback: our engine with and without BINARYMIME, and an aiosmtpd host (no
CHUNKING at all).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.reply import Reply
from common.smtp import Handler, MailEnvelope, MailSession
from tests.harness.client import Client
from tests.harness.peers import MX, Peer, mx_server, peer_server
from tests.harness.qmgr import BINARY, IPS, Rig, dns_server, enqueue, port, rig_args, state
from tests.harness.services import Stack

__all__ = ["dns_server", "port", "rig_args"]  # the harness's fixtures, used here

pytestmark = pytest.mark.timeout(30)

class Keep(Handler):
    def __init__(self, *, binarymime: bool) -> None:
        self.offers_binarymime = binarymime
        self.got: list[tuple[str, bytes]] = []

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        assert envelope.content is not None
        self.got.append((envelope.body_type, envelope.content))
        return Reply(250, "2.0.0", "Kept")


def say(c: Client, data: bytes) -> bytes:
    """Send `data`; the whole reply as the wire had it (its lines, each with CRLF)."""
    c.send(data)
    return b"".join(line.encode() + b"\r\n" for line in c.reply().text.split("\n"))


def _with_listener(handler: Keep, script: Any) -> Any:
    stack = Stack()
    try:
        return script(stack.listen(lambda: handler, hostname="engine.test"))
    finally:
        stack.close()


def test_binarymime_is_offered_with_chunking_refuses_data_and_keeps_the_octets() -> None:
    handler = Keep(binarymime=True)

    def script(port: int) -> list[bytes]:
        c = Client.session(port)
        try:
            ehlo = say(c, b"EHLO client.test\r\n")
            assert b"250-CHUNKING\r\n" in ehlo and b"BINARYMIME\r\n" in ehlo, ehlo
            assert say(c, b"MAIL FROM:<a@sender.test> BODY=BINARYMIME\r\n").startswith(b"250 ")
            assert say(c, b"RCPT TO:<b@engine.test>\r\n").startswith(b"250 ")
            data = say(c, b"DATA\r\n")  # RFC 3030 3: BINARYMIME needs BDAT
            first, rest = BINARY[:100], BINARY[100:]
            chunk = say(c, b"BDAT %d\r\n" % len(first) + first)
            last = say(c, b"BDAT %d LAST\r\n" % len(rest) + rest)
            # A 7-bit message still goes with DATA on the same session.
            assert say(c, b"MAIL FROM:<a@sender.test> BODY=7BIT\r\n").startswith(b"250 ")
            assert say(c, b"RCPT TO:<b@engine.test>\r\n").startswith(b"250 ")
            assert say(c, b"DATA\r\n").startswith(b"354 ")
            plain = say(c, b"Subject: text\r\n\r\nhi\r\n.\r\n")
            return [data, chunk, last, plain]
        finally:
            c.close()

    data, chunk, last, plain = _with_listener(handler, script)
    assert data.startswith(b"503 5.5.1 "), data
    assert chunk.startswith(b"250 ") and last.startswith(b"250 2.0.0 Kept"), (chunk, last)
    assert plain.startswith(b"250 2.0.0 Kept"), plain
    assert handler.got[0] == ("BINARYMIME", BINARY)  # every octet as sent
    assert handler.got[1][0] == "7BIT"


def test_without_binarymime_it_is_not_offered_and_bare_line_endings_in_bdat_are_refused() -> None:
    handler = Keep(binarymime=False)

    def script(port: int) -> list[bytes]:
        c = Client.session(port)
        try:
            ehlo = say(c, b"EHLO client.test\r\n")
            assert b"CHUNKING" in ehlo and b"BINARYMIME" not in ehlo, ehlo
            body = say(c, b"MAIL FROM:<a@sender.test> BODY=BINARYMIME\r\n")
            assert say(c, b"MAIL FROM:<a@sender.test>\r\n").startswith(b"250 ")
            assert say(c, b"RCPT TO:<b@engine.test>\r\n").startswith(b"250 ")
            bare = say(c, b"BDAT %d LAST\r\n" % len(BINARY) + BINARY)
            return [body, bare]
        finally:
            c.close()

    body, bare = _with_listener(handler, script)
    assert body.startswith(b"501 5.5.4 "), body
    assert bare.startswith(b"5"), bare  # may later go out with DATA: no bare CR or LF
    assert handler.got == []


def test_a_binary_message_goes_with_bdat_to_a_hop_offering_binarymime_and_bounces_5_6_3_elsewhere(
    rig_args: Any,
) -> None:
    class BinaryPeer(Peer):
        def __init__(self, *, binarymime: bool) -> None:
            super().__init__()
            self.offers_binarymime = binarymime

    async def go() -> None:
        rig = Rig(*rig_args)
        async with peer_server(IPS["ok"], rig_args[2], BinaryPeer(binarymime=True)) as peer, \
                peer_server(IPS["backup"], rig_args[2], BinaryPeer(binarymime=False)) as chunking_only, \
                mx_server(IPS["transport"], rig_args[2], MX()) as plain:
            t1 = enqueue(rig, {"a@ok.test": ("", "")}, body=BINARY, body_type="BINARYMIME")
            t2 = enqueue(rig, {"b@backup.test": ("", "")}, body=BINARY, body_type="BINARYMIME")
            t3 = enqueue(rig, {"c@transport.test": ("", "")}, body=BINARY, body_type="BINARYMIME")
            await rig.run()
            await rig.close()
        assert state(rig, t1, "a@ok.test")[0] == "delivered"
        [got] = peer.got
        assert got.params.get("BODY") == "BINARYMIME"
        assert got.content.endswith(BINARY[BINARY.index(b"From: Alice"):])  # octets intact
        for trace, address in ((t2, "b@backup.test"), (t3, "c@transport.test")):
            s, reply = state(rig, trace, address)
            assert s == "bounced" and reply.startswith("554 5.6.3"), (address, reply)
        assert chunking_only.got == [] and plain.received == []

    asyncio.run(go())
