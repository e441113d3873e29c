"""Our SMTP/LMTP client gives up on a peer that goes quiet, with a 4xx, and only then.

Against real listeners on loopback: one that greets and then never answers, and
one that answers each command slowly but within the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from common.smtp_client import Client, NextHopError

pytestmark = pytest.mark.timeout(30)


class _Peer:
    """A peer that greets, then answers each line with 250 after `answer_after` s (None: never)."""

    def __init__(self, answer_after: float | None) -> None:
        self.answer_after = answer_after
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for w in self.writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(b"220 slow.test ESMTP\r\n")
        with contextlib.suppress(OSError):
            while await reader.readline():
                if self.answer_after is None:
                    continue
                await asyncio.sleep(self.answer_after)
                writer.write(b"250 ok\r\n")


def test_a_peer_that_stops_answering_costs_the_timeout_and_a_4xx() -> None:
    async def go() -> tuple[NextHopError, float]:
        async with _Peer(None) as port:
            started = time.monotonic()
            try:
                await Client.connect("127.0.0.1", port, timeout=0.5)
            except NextHopError as exc:
                return exc, time.monotonic() - started
        raise AssertionError("connected to a peer that never answered EHLO")

    exc, waited = asyncio.run(go())
    assert exc.reply.code == 421 or 400 <= exc.reply.code < 500
    assert "Timeout waiting for 127.0.0.1" in exc.reply.text
    assert 0.4 < waited < 5


def test_a_slow_peer_within_the_timeout_is_waited_for() -> None:
    async def go() -> int:
        async with _Peer(0.3) as port:
            client = await Client.connect("127.0.0.1", port, timeout=1.0)
            reply = await client.command("NOOP")
            client.close()
            await client.writer.wait_closed()
            return reply.code

    assert asyncio.run(go()) == 250
