"""A certificate replaced while the engine serves (common/tls.py, ServerTLS), on asyncio's loop and uvloop's.

The engine is given one context when a listener starts; `ServerTLS.reload`
must reach every later handshake, implicit TLS (the 465 role) and STARTTLS
alike, while a session already in TLS finishes on the certificate it began
with, and a pair of files that does not load must change nothing.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from common import reply as R
from common.reply import Reply
from common.smtp import Handler, Limits, MailEnvelope, MailSession, serve
from common.tls import ServerTLS, make_self_signed
from tests.support.suite import tls_client_context

pytestmark = pytest.mark.timeout(60)


class Accept(Handler):
    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        return R.OK.with_text("kept")


class LoopThread:
    def __init__(self, new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.loop = new_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.Server] = []

    def run(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def serve(self, tls: ServerTLS, **kwargs: Any) -> int:
        async def start() -> asyncio.Server:
            return await serve("127.0.0.1:0", Accept, hostname="engine.test",
                               limits=Limits(idle_timeout=15, session_timeout=30),
                               tls_context=tls.context, **kwargs)

        server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def close(self) -> None:
        async def stop() -> None:
            for s in self.servers:
                s.close()
            for s in self.servers:
                await s.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    lt = LoopThread(asyncio.SelectorEventLoop if request.param == "asyncio" else uvloop.new_event_loop)
    try:
        yield lt
    finally:
        lt.close()


def _subject(client: smtplib.SMTP) -> str:
    sock = client.sock
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.rfc4514_string() + " " + cert.fingerprint(hashes.SHA256()).hex()[:8]


def _implicit(port: int) -> smtplib.SMTP_SSL:
    client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=tls_client_context())
    client.ehlo("client.test")
    return client


def _starttls(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.starttls(context=tls_client_context())
    client.ehlo("client.test")
    return client


def test_new_handshakes_get_the_new_certificate_and_open_sessions_keep_theirs(
    loop: LoopThread, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(cert, key, "old.test")
    tls = ServerTLS(cert, key)
    implicit, starttls = loop.serve(tls, implicit_tls=True), loop.serve(tls)

    with _implicit(implicit) as before:
        first = _subject(before)
        assert first.startswith("CN=old.test")
        before.mail("a@client.test")
        assert before.rcpt("b@engine.test")[0] == 250  # a transaction in progress

        make_self_signed(cert, key, "new.test")  # a renewal writes the same files
        loop.run(tls.reload)

        connects: list[Callable[[], smtplib.SMTP]] = [lambda: _implicit(implicit), lambda: _starttls(starttls)]
        for connect in connects:
            with connect() as client:
                assert _subject(client).startswith("CN=new.test")
                client.mail("a@client.test")
                client.rcpt("b@engine.test")
                assert client.data(b"Subject: new\r\n\r\nafter the reload\r\n")[0] == 250

        # The session that began before the reload finishes, on the certificate it began with.
        assert before.data(b"Subject: old\r\n\r\nbegun before the reload\r\n")[0] == 250
        assert _subject(before) == first


def test_a_pair_that_does_not_load_changes_nothing(loop: LoopThread, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(cert, key, "kept.test")
    tls = ServerTLS(cert, key)
    port = loop.serve(tls, implicit_tls=True)
    other = tmp_path / "other"
    make_self_signed(other / "cert.pem", other / "key.pem", "other.test")

    def reload_mismatched() -> None:
        tls.reload(cert, other / "key.pem")  # a key that is not the certificate's

    with pytest.raises(ssl.SSLError):
        loop.run(reload_mismatched)
    with pytest.raises(FileNotFoundError):
        loop.run(lambda: tls.reload(tmp_path / "missing.pem", key))
    with _implicit(port) as client:
        assert _subject(client).startswith("CN=kept.test")
    assert tls.cert == cert and tls.key == key
