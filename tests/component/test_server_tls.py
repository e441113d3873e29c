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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from common import reply as R
from common.reply import Reply
from common.smtp import Handler, Limits, MailEnvelope, MailSession
from common.tls import ServerTLS, make_self_signed
from tests.harness.services import Stack
from tests.support.suite import tls_client_context

pytestmark = pytest.mark.timeout(60)


class Accept(Handler):
    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        return R.OK.with_text("kept")


def listen(stack: Stack, tls: ServerTLS, **kwargs: Any) -> int:
    return stack.listen(Accept, hostname="engine.test", limits=Limits(idle_timeout=15, session_timeout=30),
                        tls_context=tls.context, **kwargs)


@pytest.fixture(params=["asyncio", "uvloop"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    s = Stack(loop=asyncio.SelectorEventLoop() if request.param == "asyncio" else uvloop.new_event_loop())
    try:
        yield s
    finally:
        s.close()


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
    stack: Stack, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(cert, key, "old.test")
    tls = ServerTLS(cert, key)
    implicit, starttls = listen(stack, tls, implicit_tls=True), listen(stack, tls)

    with _implicit(implicit) as before:
        first = _subject(before)
        assert first.startswith("CN=old.test")
        before.mail("a@client.test")
        assert before.rcpt("b@engine.test")[0] == 250  # a transaction in progress

        make_self_signed(cert, key, "new.test")  # a renewal writes the same files
        stack.call(tls.reload)

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


def test_a_pair_that_does_not_load_changes_nothing(stack: Stack, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(cert, key, "kept.test")
    tls = ServerTLS(cert, key)
    port = listen(stack, tls, implicit_tls=True)
    other = tmp_path / "other"
    make_self_signed(other / "cert.pem", other / "key.pem", "other.test")

    def reload_mismatched() -> None:
        tls.reload(cert, other / "key.pem")  # a key that is not the certificate's

    with pytest.raises(ssl.SSLError):
        stack.call(reload_mismatched)
    with pytest.raises(FileNotFoundError):
        stack.call(lambda: tls.reload(tmp_path / "missing.pem", key))
    with _implicit(port) as client:
        assert _subject(client).startswith("CN=kept.test")
    assert tls.cert == cert and tls.key == key
