"""Scripted next hops: remote MX hosts (aiosmtpd) and hosts on our own engine (the MDA's part, a DSN hop).

- `MX`: an aiosmtpd handler (a real, foreign SMTP implementation) in a remote
  host's part: answers 250, 4xx or 5xx, drops the connection after DATA or
  stalls, takes AUTH (relayuser / s3cret) after STARTTLS when asked, and keeps
  what it got.  `mx_server` serves it on the caller's event loop (the queue
  manager's in-process tests); `mx_thread` serves it on a thread of its own, for
  tests whose mail comes from real processes (the daemons, Postfix).
- `Peer` with `peer_server`: a next hop on our own engine, for what aiosmtpd
  cannot offer (DSN, REQUIRETLS); it keeps the parameters it was given.
- `LMTPScript`: the MDA's part on our engine, one scripted reply per recipient;
  `lmtp_server` serves it (or any handler) over LMTP on the caller's event loop
  and yields its address, for the queue manager's `Rig(lmtp=...)`.

`mx_server` and `peer_server` listen on the address the caller picks (127.0.0.x
for the MX hosts of tests/harness/qmgr.py; port 0 for any free one, then
`MX.port` says which); `lmtp_server` on a free port of 127.0.0.1.
(tests/support/peers.py finds the real peer programs.)
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from common.reply import Reply
from common.smtp import Handler, Limits, MailEnvelope, MailSession, serve
from common.tls import server_context
from tests.support.ports import free_port

# --- aiosmtpd remote MX hosts ---------------------------------------------------------------


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    tls: bool
    login: str = ""

    def parsed(self) -> EmailMessage:
        msg = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class MX:
    """An aiosmtpd handler that plays one remote host's part."""

    mode: str = "ok"  # ok | soft | hard | drop | stall
    refuse: dict[str, str] = field(default_factory=dict)  # RCPT address -> reply
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    in_data: int = 0
    most_in_data: int = 0
    logins: list[bytes] = field(default_factory=list)  # every AUTH attempt's user name, good or bad
    port: int = 0  # where mx_server or mx_thread listens

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        if self.mode == "soft":
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_data += 1
        self.most_in_data = max(self.most_in_data, self.in_data)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.mode == "stall":
                await asyncio.sleep(3600)
            if self.mode == "drop":
                assert server.transport is not None
                server.transport.close()
                return "250 never seen"
            if self.mode == "hard":
                return "554 5.6.0 Content refused"
            assert isinstance(envelope.content, bytes) and envelope.mail_from is not None
            login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else ""
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                                          session.ssl is not None, login))
            return "250 2.0.0 Accepted"
        finally:
            self.in_data -= 1


AnyMX = TypeVar("AnyMX", bound=MX)


def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    if isinstance(server.event_handler, MX) and isinstance(data, LoginPassword):
        server.event_handler.logins.append(data.login)
    ok = isinstance(data, LoginPassword) and data.login == b"relayuser" and data.password == b"s3cret"
    return AuthResult(success=ok, handled=False, auth_data=data)


@contextlib.asynccontextmanager
async def mx_server(
    ip: str, port: int, handler: AnyMX, tls: tuple[Path, Path] | None = None, auth: bool = False,
    idle_timeout: float = 300.0,
) -> AsyncIterator[AnyMX]:
    loop = asyncio.get_running_loop()
    ctx = server_context(*tls) if tls else None

    def factory() -> SMTP:
        handler.connections += 1
        return SMTP(handler, hostname=f"mx-{ip}", tls_context=ctx, authenticator=authenticator if auth else None,
                    auth_require_tls=True, timeout=idle_timeout)

    server = await loop.create_server(factory, ip, port)
    handler.port = server.sockets[0].getsockname()[1]
    try:
        yield handler
    finally:
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def mx_thread(
    handler: AnyMX, *, tls: ssl.SSLContext | None = None, hostname: str = "mx.remote.test"
) -> Iterator[AnyMX]:
    """`handler` on 127.0.0.1 (a free port: `handler.port`), served by aiosmtpd's Controller
    on a thread of its own; STARTTLS with `tls` when given."""
    handler.port = free_port()  # Controller(port=0) cannot say which port it got
    controller = Controller(handler, hostname="127.0.0.1", port=handler.port, server_hostname=hostname,
                            tls_context=tls)
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()


# --- next hops on our own engine ------------------------------------------------------------


class LMTPScript(Handler):
    """The MDA's part: one LMTP reply per recipient, from `outcomes` (250 for the rest)."""

    ehlo_keywords = ("XTRACE",)  # the queue manager names the trace id, as to the real MDA

    def __init__(self, outcomes: dict[str, Reply]) -> None:
        self.outcomes = outcomes
        self.transactions: list[list[str]] = []

    async def data(self, session: MailSession, envelope: MailEnvelope) -> list[Reply]:
        self.transactions.append(list(envelope.rcpt_tos))
        return [self.outcomes.get(r, Reply(250, "2.0.0", "Saved")) for r in envelope.rcpt_tos]


@contextlib.asynccontextmanager
async def lmtp_server(handler: Handler, *, limits: Limits | None = None) -> AsyncIterator[str]:
    """`handler` in the MDA's part, served over LMTP by our engine on a free port of
    127.0.0.1 on the running loop; yields its address, "127.0.0.1:PORT"."""
    server = await serve("127.0.0.1:0", lambda: handler, hostname="mda.test",
                         limits=Limits() if limits is None else limits, lmtp=True)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Got:
    sender: str
    params: dict[str, str]
    rcpt_params: dict[str, dict[str, str]]
    content: bytes
    tls: bool


class Peer(Handler):
    """A next hop on our own engine, offering DSN / REQUIRETLS as told, keeping what it got."""

    def __init__(self, *, dsn: bool = True, requiretls: bool = False) -> None:
        self.offers_dsn = dsn
        self.offers_requiretls = requiretls
        self.got: list[Got] = []

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        assert envelope.content is not None and envelope.mail_from is not None
        self.got.append(Got(envelope.mail_from, dict(envelope.params),
                            {r: dict(envelope.rcpt_params.get(r, {})) for r in envelope.rcpt_tos},
                            envelope.content, session.tls))
        return Reply(250, "2.0.0", "Accepted")


@contextlib.asynccontextmanager
async def peer_server(ip: str, port: int, peer: Peer, *, tls: tuple[Path, Path] | None = None,
                      utf8: bool = True) -> AsyncIterator[Peer]:
    server = await serve(f"{ip}:{port}", lambda: peer, hostname=f"mx-{ip}", limits=Limits(),
                         tls_context=server_context(*tls) if tls else None, utf8=utf8)
    try:
        yield peer
    finally:
        server.close()
        await server.wait_closed()
