"""The engine on uvloop, the loop the daemons run on: what uvloop does its own way.

uvloop's transports are not asyncio's classes, it serves only servers it made
itself, and its TLS (loop.start_tls) is its own port of asyncio's.  These run
the engine on a uvloop loop whatever MAILROOM_EVENT_LOOP says: STARTTLS with
commands injected after it (CVE-2011-0411), implicit TLS (the 465 role), a
Unix socket, one listener setting on an IPv4 and an IPv6 address, and a
pipelined batch through a handler whose MAIL hook really waits.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from common import reply as R
from common.endpoint import Endpoint
from common.reply import Reply
from common.smtp import Handler, Limits, MailEnvelope, MailSession, serve
from common.tls import make_self_signed, server_context
from tests.harness.client import CLOSED, STARTTLS_HANDSHAKE, Client, line, play

pytestmark = pytest.mark.timeout(30)


class Keep(Handler):
    """Keeps what it is given; its MAIL hook waits a loop turn, as a database look-up would."""

    kept: list[bytes] = []

    async def mail(self, session: MailSession, envelope: MailEnvelope, sender: str) -> Reply | None:
        await asyncio.sleep(0.01)
        return None

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        assert envelope.content is not None
        Keep.kept.append(envelope.content)
        return R.OK.with_text(f"kept on {'TLS' if session.tls else 'plaintext'}")


class UVLoop:
    """A uvloop loop in a thread, serving what `start` asks for."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.Server] = []

    def serve(self, listen: Any, **kwargs: Any) -> asyncio.Server:
        async def start() -> asyncio.Server:
            return await serve(listen, Keep, hostname="engine.test", limits=Limits(), **kwargs)

        server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.servers.append(server)
        return server

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def close(self) -> None:
        async def stop() -> None:
            for s in self.servers:
                s.close()
            for s in self.servers:
                await s.wait_closed()
            await asyncio.sleep(0.1)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def uv() -> Iterator[UVLoop]:
    Keep.kept = []
    u = UVLoop()
    try:
        yield u
    finally:
        u.close()


@pytest.fixture
def tls(tmp_path: Path) -> ssl.SSLContext:
    make_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "engine.test")
    return server_context(tmp_path / "cert.pem", tmp_path / "key.pem")


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def test_the_engine_runs_on_uvloop(uv: UVLoop) -> None:
    server = uv.serve("127.0.0.1:0")
    assert isinstance(uv.call(asyncio.get_running_loop), uvloop.Loop)
    assert isinstance(server.get_loop(), uvloop.Loop)


def test_starttls_on_uvloop_discards_what_was_pipelined_after_it(uv: UVLoop, tls: ssl.SSLContext) -> None:
    port = _port(uv.serve("127.0.0.1:0", tls_context=tls))
    s = Client.connect(port)
    try:
        play(s, [
            (None, "220 "), (line("EHLO client.example"), "250 "),
            (b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n", "220 "),  # one packet
            (STARTTLS_HANDSHAKE, None),
            (line("EHLO client.example"), "250 "),
            (line("MAIL FROM:<a@b.example>"), "250 2.1.0"),  # not "nested MAIL": the injected one is gone
            (line("RCPT TO:<x@y.example>"), "250 2.1.5"),
            (line("DATA"), "354 "), (b"Subject: s\r\n\r\nover TLS\r\n.\r\n", "250 2.0.0 kept on TLS"),
            (line("QUIT"), "221 "),
        ])
        first_tls_reply = s.transcript[s.transcript.index("   <TLS handshake>") + 2]
        assert first_tls_reply == "S: 250-engine.test", "\n".join(s.transcript)
    finally:
        s.close()
    assert Keep.kept == [b"Subject: s\r\n\r\nover TLS\r\n"]


def test_implicit_tls_on_uvloop(uv: UVLoop, tls: ssl.SSLContext) -> None:
    port = _port(uv.serve("127.0.0.1:0", tls_context=tls, implicit_tls=True))
    s = Client.connect(port, tls=True)
    try:
        play(s, [
            (None, "220 engine.test"), (line("EHLO client.example"), "250 "),
            (line("MAIL FROM:<a@b.example>") + line("RCPT TO:<x@y.example>") + line("DATA"),
             ["250 2.1.0", "250 2.1.5", "354 "]),
            (b"hi\r\n.\r\n", "250 2.0.0 kept on TLS"), (line("QUIT"), "221 "), (None, CLOSED),
        ])
    finally:
        s.close()


def test_a_unix_socket_listener_on_uvloop(uv: UVLoop, tmp_path: Path) -> None:
    path = tmp_path / "lmtp.sock"
    uv.serve(f"unix:{path}", lmtp=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    s = Client(sock)
    try:
        play(s, [
            (None, "220 engine.test LMTP"), (line("LHLO client.example"), "250 "),
            (line("MAIL FROM:<a@b.example>"), "250 2.1.0"),
            (line("RCPT TO:<x@y.example>") + line("RCPT TO:<z@y.example>"), ["250 2.1.5", "250 2.1.5"]),
            (line("DATA"), "354 "),
            (b"hi\r\n.\r\n", ["250 2.0.0 kept on plaintext", "250 2.0.0 kept on plaintext"]),
            (line("QUIT"), "221 "),
        ])
    finally:
        s.close()


def test_one_setting_on_an_ipv4_and_an_ipv6_address_on_uvloop(uv: UVLoop) -> None:
    socks = [Endpoint.parse("127.0.0.1:0").bind(), Endpoint.parse("[::1]:0").bind()]
    for sock in socks:
        sock.listen(16)
    server = uv.serve(socks)
    addresses = sorted((s.family, s.getsockname()[1]) for s in server.sockets)
    assert [family for family, _ in addresses] == [socket.AF_INET, socket.AF_INET6]
    for family, port in addresses:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        s = Client(socket.create_connection((host, port), timeout=10))
        try:
            play(s, [(None, "220 engine.test"), (line("QUIT"), "221 "), (None, CLOSED)])
        finally:
            s.close()
    # Closing the one server closes both addresses.
    uv.call(server.close)
    asyncio.run_coroutine_threadsafe(server.wait_closed(), uv.loop).result(10)
    assert not uv.call(server.is_serving)
    for family, port in addresses:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=10).close()


def test_a_pipelined_batch_through_a_waiting_hook_keeps_its_order_on_uvloop(uv: UVLoop) -> None:
    port = _port(uv.serve("127.0.0.1:0"))
    s = Client(socket.create_connection(("127.0.0.1", port), timeout=10))
    try:
        play(s, [
            (None, "220 "),
            # One packet: HELO and NOOP are answered at once, MAIL waits in its hook,
            # and everything after it keeps its place behind it.
            (line("EHLO c.example") + line("NOOP") + line("MAIL FROM:<a@b.example>") + line("NOOP")
             + line("RCPT TO:<x@y.example>") + line("DATA") + b"one\r\n.\r\n" + line("RSET")
             + line("MAIL FROM:<a@b.example>") + line("RCPT TO:<x@y.example>") + line("DATA")
             + b"two\r\n.\r\n" + line("QUIT"),
             ["250 ", "250 2.0.0", "250 2.1.0", "250 2.0.0", "250 2.1.5", "354 ", "250 2.0.0 kept",
              "250 2.0.0", "250 2.1.0", "250 2.1.5", "354 ", "250 2.0.0 kept", "221 "]),
            (None, CLOSED),
        ])
    finally:
        s.close()
    assert Keep.kept == [b"one\r\n", b"two\r\n"]


def test_implicit_tls_when_the_clienthello_is_waiting_before_the_loop_accepts(uv: UVLoop, tls: ssl.SSLContext) -> None:
    # uvloop starts reading a new connection once connection_made returns, even
    # if it paused reading there: a ClientHello already waiting must reach the
    # TLS layer all the same, not the SMTP reader.
    port = _port(uv.serve("127.0.0.1:0", tls_context=tls, implicit_tls=True))
    greetings: list[bytes | str] = []

    def client() -> None:
        try:
            s = Client.connect(port, tls=True)  # the handshake: sent at once, read when the loop is back
            try:
                greetings.append(s.sock.recv(100)[:4])
            finally:
                s.close()
        except OSError as exc:
            greetings.append(repr(exc))

    blocked = threading.Event()

    def block() -> None:
        blocked.set()
        time.sleep(0.5)  # the loop is busy while the clients connect and say hello

    asyncio.run_coroutine_threadsafe(_call(block), uv.loop)
    blocked.wait(10)
    clients = [threading.Thread(target=client) for _ in range(5)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(20)
    assert greetings == [b"220 "] * 5


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()
