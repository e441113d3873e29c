"""Where a remote domain's mail goes: relayhost, transport map, or MX lookup.

RFC 5321 5.1: MX records in preference order (equal preferences shuffled),
falling back to the domain's own A/AAAA when there is no MX.  RFC 7505: a
single `MX 0 .` means the domain accepts no mail (bounce 5.1.10).  A domain
that does not exist bounces (5.1.2); a DNS failure or timeout defers (4.4.3).
An MX pointing back at this host would loop (5.4.6).
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field

from common import reply as R
from common.config import parse_hostport
from common.dns import DNSTempError, Resolver, Wire
from common.reply import Reply


@dataclass(frozen=True)
class Route:
    hosts: list[tuple[str, int]] = field(default_factory=list)  # try in this order
    error: Reply | None = None  # set when there is nowhere to go
    via: str = ""  # "relayhost", "transport" or "mx", for logs
    names: dict[str, str] = field(default_factory=dict)  # address -> MX name (what TLS verifies)


def _is_us(ip: str, port: int, listening: tuple[str, int]) -> bool:
    """Would connecting to ip:port reach our own listener?"""
    host, our_port = listening
    if port != our_port:
        return False
    if host in ("0.0.0.0", "::", ""):
        return _is_local_address(ip)
    return ip == host


def _is_local_address(ip: str) -> bool:
    # An address is this machine's exactly when a socket can be bound to it.
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def make_resolver(nameservers: list[str], timeout: float) -> Wire:
    """An uncached resolver on `nameservers`, for tests and tools that route without a daemon
    (the daemons are handed their process's caching one: common/daemon.py Context.resolver)."""
    return Wire(nameservers, timeout)


async def route(
    domain: str,
    *,
    relayhost: str,
    transport: dict[str, str],
    resolver: Resolver,
    own_names: set[str],
    port: int = 25,
    listening: tuple[str, int] | None = None,
) -> Route:
    """Where mail for `domain` goes.  `listening` is our own public listener
    (host, port): an MX whose address and port lead back to it is this host,
    whatever its name."""
    if domain in transport:
        return Route([parse_hostport(transport[domain], 25)], via="transport")
    if relayhost:
        return Route([parse_hostport(relayhost, 25)], via="relayhost")
    if domain.startswith("["):  # an address literal: deliver to that address
        return Route([(domain.strip("[]").removeprefix("IPv6:"), port)], via="literal")
    try:
        answer = await resolver.lookup(domain, "MX")
    except DNSTempError as exc:
        return Route(error=R.DNS_FAILED.with_text(f"DNS lookup failed for {domain}: {exc}"))
    if answer.nxdomain:
        return Route(error=R.NO_SUCH_DOMAIN.with_text(f"Host or domain name not found: {domain}"))
    # No MX at all: the domain's own address is its implicit MX (RFC 5321 5.1).
    mxs = sorted((pref, random.random(), name) for pref, name in answer.mx()) if answer.records else [(0, 0.0, domain)]
    names = [name for _, _, name in mxs]
    if names == [""] or (len(mxs) == 1 and mxs[0][2] in ("", ".")):
        return Route(error=R.NULL_MX.with_text(f"Domain {domain} does not accept mail (null MX)"))
    # RFC 5321 5.1: when we are one of the MX hosts, only hosts preferred to us
    # may be tried (we are their backup); when we are the best, it is a loop.
    ours = [i for i, n in enumerate(names) if n.lower() in own_names]
    if ours:
        names = [n for (pref, _, n) in mxs if pref < mxs[ours[0]][0]]
        if not names:
            return Route(error=R.MAIL_LOOP.with_text(f"MX for {domain} points back to this host: mail loop"))
    preference = {n: pref for pref, _, n in reversed(mxs)}
    found: list[tuple[int, str]] = []  # (MX preference, address), in trying order
    names_of: dict[str, str] = {}
    failures = 0
    for name in names:
        for rdtype in ("AAAA", "A"):
            try:
                addresses = (await resolver.lookup(name, rdtype)).addresses()
            except DNSTempError:
                failures += 1
                continue
            for ip in addresses:
                found.append((preference.get(name, 0), ip))
                names_of.setdefault(ip, name)
    # The same rule by address: an MX named anything at all may still be us.
    mine = [pref for pref, ip in found if listening is not None and _is_us(ip, port, listening)]
    if mine:
        found = [(pref, ip) for pref, ip in found if pref < min(mine)]
        if not found:
            return Route(error=R.MAIL_LOOP.with_text(f"MX for {domain} points back to this host: mail loop"))
    hosts = [(ip, port) for _, ip in found]
    if not hosts:
        if failures:
            return Route(error=R.DNS_FAILED.with_text(f"DNS lookup failed for the MX of {domain}"))
        return Route(error=R.NO_SUCH_DOMAIN.with_text(f"No address for any MX of {domain}"))
    return Route(hosts, via="mx", names=names_of)
