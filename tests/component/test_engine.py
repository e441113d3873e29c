"""The engine with small handlers of its own, on a loopback port: the contract and the timers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from common import reply as R
from common.reply import Reply
from common.smtp import Handler, Limits, MailEnvelope, MailSession
from tests.harness.client import CLOSED, Client, line, play
from tests.harness.services import Stack

pytestmark = pytest.mark.timeout(30)


class Slow(Handler):
    """Takes longer over a message than the idle timeout allows a silent client."""

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        await asyncio.sleep(1.5)
        return R.OK.with_text("stored, slowly")

    async def rcpt(self, session: MailSession, envelope: MailEnvelope, recipient: str) -> Reply | None:
        if recipient.startswith("returned"):
            return R.UNKNOWN_USER  # wrong: a refusal must be raised; the engine refuses all the same
        return None


@pytest.fixture
def port() -> Iterator[int]:
    stack = Stack()
    try:
        yield stack.listen(Slow, hostname="engine.test", limits=Limits(idle_timeout=1.0))
    finally:
        stack.close()


def _open(port: int) -> Client:
    return Client(socket.create_connection(("127.0.0.1", port), timeout=10))


def test_the_idle_timeout_counts_only_the_clients_silence(port: int) -> None:
    s = _open(port)
    try:
        play(s, [
            (None, "220 "), (line("EHLO c.example"), "250 "),
            (line("MAIL FROM:<a@b.example>"), "250 2.1.0"), (line("RCPT TO:<x@y.example>"), "250 2.1.5"),
            (line("DATA"), "354 "), (b"Subject: s\r\n\r\nhi\r\n.\r\n", "250 2.0.0 stored, slowly"),
            # And a client that stays silent is told so and let go.
            (None, "421 4.4.2"), (None, CLOSED),
        ])
    finally:
        s.close()


def test_a_refusal_returned_instead_of_raised_is_still_a_refusal(port: int) -> None:
    s = _open(port)
    try:
        play(s, [
            (None, "220 "), (line("EHLO c.example"), "250 "), (line("MAIL FROM:<a@b.example>"), "250 2.1.0"),
            (line("RCPT TO:<returned@y.example>"), "550 5.1.1"), (line("DATA"), "503 5.5.1"),
        ])
    finally:
        s.close()
