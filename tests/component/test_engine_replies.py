"""Replies to pipelined commands leave in one write; a client that waits is answered at once.

RFC 2920 3.1 lets a server hold the replies to a group of commands the client
sent together; the engine writes them when it next waits for input, so a
pipelined MAIL, RCPT, DATA costs one send instead of three, and LMTP's replies
after DATA (one per recipient) go out together.  The session runs on a real
socket pair; its transport's writes are counted.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from common import reply as R
from common.reply import Reply
from common.smtp import Handler, Limits, MailEnvelope, MailSession
from common.smtp.admission import Connections
from common.smtp.serve import Listener
from common.smtp.session import Session

pytestmark = pytest.mark.timeout(30)


class Accept(Handler):
    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply | list[Reply]:
        return [R.OK.with_text(f"delivered to {r}") for r in envelope.rcpt_tos]


class _CountingTransport:
    """The session's transport, with every write recorded in `writes`."""

    def __init__(self, inner: Any, writes: list[bytes]) -> None:
        self._inner = inner
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def _serve(lmtp: bool) -> tuple[socket.socket, list[bytes]]:
    """A session on one end of a socket pair; returns the other end and the list of writes."""
    loop = asyncio.get_running_loop()
    server_end, client_end = socket.socketpair()
    writes: list[bytes] = []

    class Counting(Session):
        def connection_made(self, transport: Any) -> None:
            # A stand-in that counts: uvloop's transports do not let `write` be replaced.
            super().connection_made(_CountingTransport(transport, writes))

    listener = Listener(hostname="engine.test", limits=Limits(), connections=Connections(), lmtp=lmtp)
    await loop.connect_accepted_socket(lambda: Counting(Accept(), listener), server_end)
    client_end.setblocking(False)
    return client_end, writes


async def _until(writes: list[bytes], text: bytes, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in b"".join(writes):
        assert time.monotonic() < deadline, f"no {text!r} in {writes!r}"
        await asyncio.sleep(0.01)


async def _send(client: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(client, data)


def test_replies_to_a_pipelined_group_leave_in_one_write() -> None:
    async def main() -> list[bytes]:
        client, writes = await _serve(lmtp=False)
        await _until(writes, b"220 ")
        await _send(client, b"EHLO c.example\r\n")
        await _until(writes, b"PIPELINING")
        before = len(writes)
        await _send(client, b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\n")
        await _until(writes, b"354 ")
        group = writes[before:]
        client.close()
        return group

    group = asyncio.run(main())
    assert len(group) == 1, group
    assert group[0].startswith(b"250 2.1.0 ") and b"\r\n250 2.1.5 " in group[0] and b"\r\n354 " in group[0]


def test_a_client_that_waits_gets_each_reply_at_once() -> None:
    async def main() -> list[bytes]:
        client, writes = await _serve(lmtp=False)
        await _until(writes, b"220 ")
        steps = [(b"HELO c.example\r\n", b"250 engine.test"), (b"MAIL FROM:<a@b.example>\r\n", b"250 2.1.0"),
                 (b"RCPT TO:<x@y.example>\r\n", b"250 2.1.5"), (b"NOOP\r\n", b"250 2.0.0 Ok")]
        for command, expect in steps:
            await _send(client, command)
            await _until(writes, expect)  # the reply left although nothing more was sent
        client.close()
        return writes

    writes = asyncio.run(main())
    assert len(writes) == 5  # the greeting and one write per command


def test_lmtp_replies_after_data_leave_together() -> None:
    async def main() -> list[bytes]:
        client, writes = await _serve(lmtp=True)
        await _until(writes, b"220 ")
        await _send(client, b"LHLO c.example\r\n")
        await _until(writes, b"PIPELINING")
        await _send(client, b"MAIL FROM:<a@b.example>\r\n")
        await _until(writes, b"250 2.1.0")
        for rcpt in (b"x", b"y", b"z"):
            await _send(client, b"RCPT TO:<" + rcpt + b"@y.example>\r\n")
            await _until(writes, b"250 2.1.5")
        await _send(client, b"DATA\r\n")
        await _until(writes, b"354 ")
        before = len(writes)
        await _send(client, b"Subject: s\r\n\r\nhi\r\n.\r\n")
        await _until(writes, b"delivered to z@y.example")
        after = writes[before:]
        client.close()
        return after

    after = asyncio.run(main())
    assert len(after) == 1, after
    assert after[0].count(b"250 2.0.0 delivered to ") == 3
