"""Serving SMTP/LMTP sessions on a listening socket, and what is set once per listener.

The daemon skeleton binds the socket (while it may still be root), loads the
TLS context and drops privileges; `serve` then only turns each accepted
connection into a `Session` with a fresh handler and the listener's `Listener`.

- `Limits`: what a listener allows.  It is the `[smtp]` section of the config
  (common/config.py writes the defaults, once) with the one value the config
  does not set, the TLS handshake timeout; `limits_from` makes it from the
  loaded section, with per-listener changes.
- `Listener`: how one listener speaks (host name, TLS, LMTP, SMTPUTF8), its
  admission (`Connections`, common/smtp/admission.py: the caps and stress
  mode), and the idle and TLS handshake timeouts as they are now (shorter
  under stress).  The session asks it to be admitted and says when it leaves;
  the session itself keeps the timers and does the TLS handshake (STARTTLS,
  or implicit TLS on the 465 role), so that a failed handshake is one log line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from common import reply as R
from common.config import SMTPSection
from common.endpoint import Endpoint
from common.reply import Reply
from common.smtp.admission import Connections, Member, client_address
from common.smtp.handler import Handler
from common.smtp.session import Session

# As Endpoint.listen: asyncio listens again with this when it starts serving.
BACKLOG = 1024


@dataclass(frozen=True)
class Limits(SMTPSection):
    """What one listener allows: the [smtp] settings (their defaults are the config's),
    changed per listener, and what the config does not set."""

    tls_handshake_timeout: float = 30.0


def limits_from(smtp: SMTPSection, **overrides: Any) -> Limits:
    """The [smtp] settings of the config as a listener's limits, with per-listener changes."""
    values = {f.name: getattr(smtp, f.name) for f in fields(smtp)}
    values.update(overrides)
    return Limits(**values)


@dataclass(frozen=True)
class Listener:
    """How one listener speaks and whom it admits: what is the same for all of its sessions."""

    hostname: str
    limits: Limits
    connections: Connections
    tls_context: ssl.SSLContext | None = None
    implicit_tls: bool = False
    require_starttls: bool = False
    lmtp: bool = False
    utf8: bool = True
    name: str = ""  # the listening address, as metrics label it
    # Made once here rather than once per connection (see __post_init__).
    greeting: Reply = field(init=False, repr=False, compare=False)
    helo_reply: Reply = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kind = "LMTP" if self.lmtp else "ESMTP"
        object.__setattr__(self, "greeting", R.GREETING.with_text(f"{self.hostname} {kind} Mailroom"))
        object.__setattr__(self, "helo_reply", R.HELLO.with_text(self.hostname))

    def admit(self, member: Member, ip: str) -> bool:
        """Count a new connection from `ip` in, or False when a cap is reached."""
        return self.connections.admit(member, ip, self.limits, self.name)

    def release(self, member: Member) -> None:
        """A session is gone (or was made to give way): count it out."""
        self.connections.release(member, self.limits, self.name)

    def idle_timeout(self) -> float:
        """How long a client may stay silent, now: stress_timeout at most under stress."""
        lim = self.limits
        return min(lim.idle_timeout, lim.stress_timeout) if self.connections.stressed else lim.idle_timeout

    def handshake_timeout(self) -> float:
        """How long a TLS handshake may take, now: stress_timeout at most under stress."""
        lim = self.limits
        stressed = self.connections.stressed
        return min(lim.tls_handshake_timeout, lim.stress_timeout) if stressed else lim.tls_handshake_timeout


async def serve(
    listen: socket.socket | Sequence[socket.socket] | str,
    make_handler: Callable[[], Handler],
    *,
    hostname: str,
    limits: Limits,
    tls_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    require_starttls: bool = False,
    lmtp: bool = False,
    utf8: bool = True,
    connections: Connections | None = None,
) -> asyncio.Server:
    """Serve sessions on the bound socket(s) `listen`: one listener setting's
    addresses, each served alike (same handler, limits and caps).

    A string `listen` ('host:port', 'unix:/path') is bound here, for tests
    and tools; daemons pass the sockets their skeleton bound.  Listeners
    given the same `connections` share their caps (the MSA's 587 and 465
    roles count one client's connections together).
    """
    if implicit_tls and tls_context is None:
        raise ValueError("implicit TLS needs a TLS context")
    if isinstance(listen, str):
        bound = [Endpoint.parse(listen).bind()]
    elif isinstance(listen, socket.socket):
        bound = [listen]
    else:
        bound = list(listen)
    if not bound:
        raise ValueError("nothing to serve on")
    for sock in bound:
        sock.setblocking(False)
    listener = Listener(
        hostname=hostname, limits=limits, connections=connections if connections is not None else Connections(),
        tls_context=tls_context, implicit_tls=implicit_tls, require_starttls=require_starttls, lmtp=lmtp, utf8=utf8,
        name=address_of(bound[0]),  # the metrics' listener label: the setting's first address
    )

    def factory() -> Session:
        return Session(make_handler(), listener)

    # Through the loop's public create_server, one per address: uvloop serves only
    # what it made itself.  Callers close, wait for and inspect one server per
    # listener setting, as for a host name that resolves to several addresses.
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(factory, sock=sock, backlog=BACKLOG) for sock in bound]
    return servers[0] if len(servers) == 1 else Servers(loop, servers)


class Servers(asyncio.Server):
    """Several servers (one per address of a listener setting) as one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, servers: list[asyncio.Server]) -> None:
        # asyncio.Server's own state is not used: every call goes to the parts.
        self._loop = loop
        self._parts = servers

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return any(s.is_serving() for s in self._parts)

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(sock for s in self._parts for sock in s.sockets)

    def close(self) -> None:
        for s in self._parts:
            s.close()

    async def start_serving(self) -> None:
        for s in self._parts:
            await s.start_serving()

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._parts))

    async def wait_closed(self) -> None:
        for s in self._parts:
            await s.wait_closed()


def address_of(sock: socket.socket) -> str:
    """A listening socket's address as the config writes it: host:port, [v6]:port, unix:/path."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def in_networks(ip: str, networks: list[str]) -> bool:
    """True when `ip` is inside one of `networks` (e.g. trusted_networks)."""
    try:
        a = ipaddress.ip_address(client_address(ip))
    except ValueError:
        return False
    return any(a in ipaddress.ip_network(n, strict=False) for n in networks)
