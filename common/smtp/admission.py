"""Who may open a session on a listener: the connection caps, stress mode, the peer's uid.

- `max_connections` per listener (or per group of listeners that share one
  `Connections`: the MSA's 587 and 465 roles), and `max_connections_per_client`
  per client *network*: an IPv4 address, but an IPv6 /64 (`client_key`).  One
  IPv6 host is given a /64 and may use any of its 2^64 addresses: counted per
  address, a single client could fill the listener.
- Stress mode, as Postfix's smtpd has: when the open connections reach
  `stress_threshold` percent of `max_connections` (80 by default), the idle
  and TLS handshake timeouts of every session of the listener, open ones
  included, shrink to `stress_timeout` (10 s), so clients that only hold a
  slot give it up.  It ends when the count is back under three quarters of
  that mark (so it does not flap at the edge).  Both moments are logged, and
  the start is counted (`mailroom_stress_total` on /metrics).
- A session that must still prove who it is (the internal listener over TCP,
  before the MSA's AUTH with the installation's secret: `Member.unproven`) is
  made to give way, oldest first, when a new connection finds the listener
  full.  So a local process that opens connections and stays silent cannot
  keep the MSA out: the MSA's connection proves itself within a millisecond,
  while the intruder's are the oldest unproven ones.
- On a Unix socket the kernel says who connected (`peer_uid`, SO_PEERCRED):
  a handler may turn away any uid but the one it serves (the MTA's internal
  listener takes only the daemons' own, the MSA's).

Counting is in memory, per process; nothing here touches a socket but to ask
its peer's uid: a session (`common/smtp/session.py`) asks to be admitted and
says when it leaves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from common import counters

if TYPE_CHECKING:
    from common.smtp.session import Limits

log = logging.getLogger("smtp")

# struct ucred (pid, uid, gid), as SO_PEERCRED gives it.
_UCRED = struct.calcsize("3i")
# The prefix one IPv6 client gets (RFC 6177: a /64 is the least a site is given;
# the interface identifier in the low 64 bits is the host's to choose).
IPV6_CLIENT_PREFIX = 64


def client_key(ip: str) -> str:
    """What the per-client cap counts: an IPv4 address as it is, an IPv6 address by its /64."""
    if ":" not in ip:
        return ip  # IPv4 (the common case, no parsing), or "local" on a Unix socket
    try:
        network = ipaddress.IPv6Network((ipaddress.IPv6Address(ip.partition("%")[0]), IPV6_CLIENT_PREFIX), strict=False)
    except ValueError:
        return ip
    return str(network)


class Member(Protocol):
    """What admission needs of a session."""

    @property
    def unproven(self) -> bool:
        """The session must still prove who it is (and so may be made to give way)."""
        ...

    def evict(self) -> None:
        """Give way to a newer connection: say so (421) and close."""

    def under_stress(self) -> None:
        """Stress mode began or ended: the timeouts changed, take them up now."""


@dataclass(eq=False)
class Connections:
    """Open connections of one listener (or of listeners that share a cap)."""

    total: int = 0
    per_client: Counter[str] = field(default_factory=Counter)  # client_key -> open connections
    stressed: bool = False
    # Each admitted session and its client key, oldest first.
    members: dict[Member, str] = field(default_factory=dict)

    def admit(self, member: Member, ip: str, limits: Limits, listener: str) -> bool:
        """Count `member` (a new connection from `ip`) in, or False when a cap is reached."""
        key = client_key(ip)
        while self.total >= limits.max_connections or self.per_client[key] >= limits.max_connections_per_client:
            whole = self.total >= limits.max_connections
            victim = next(
                (m for m, k in self.members.items() if m.unproven and (whole or k == key)), None
            )
            if victim is None:
                return False
            log.info("%s: full; an unproven connection gives way to a new one", listener)
            self.release(victim, limits, listener)
            victim.evict()
        self.total += 1
        self.per_client[key] += 1
        self.members[member] = key
        self._stress(limits, listener)
        return True

    def release(self, member: Member, limits: Limits, listener: str) -> None:
        """`member` is gone (or made to give way): count it out."""
        key = self.members.pop(member, None)
        if key is None:
            return
        self.total -= 1
        self.per_client[key] -= 1
        if self.per_client[key] <= 0:
            del self.per_client[key]
        self._stress(limits, listener)

    def _stress(self, limits: Limits, listener: str) -> None:
        start = stress_start(limits)
        if start <= 0:
            return
        if not self.stressed and self.total >= start:
            self.stressed = True
            counters.inc(counters.STRESS, listener=listener)
            log.warning(
                "stress: %d of %d connections on %s: idle and TLS handshake timeouts now %gs (were %gs, %gs)",
                self.total, limits.max_connections, listener, limits.stress_timeout, limits.idle_timeout,
                limits.tls_handshake_timeout,
            )
        elif self.stressed and self.total < max(1, start * 3 // 4):
            self.stressed = False
            log.warning("stress over: %d of %d connections on %s: timeouts back to %gs and %gs",
                        self.total, limits.max_connections, listener, limits.idle_timeout,
                        limits.tls_handshake_timeout)
        else:
            return
        for m in list(self.members):
            m.under_stress()


def peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), or None."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED))
    except OSError:
        return None
    return int(uid)


def stress_start(limits: Limits) -> int:
    """How many open connections put a listener under stress (0: never)."""
    if limits.stress_threshold <= 0:
        return 0
    return max(1, limits.max_connections * limits.stress_threshold // 100)
