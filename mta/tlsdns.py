"""The DNS questions outbound TLS policy asks, and whether a validating resolver vouched for each answer.

DANE (RFC 7672) rests on DNSSEC, and this process does not validate DNSSEC
itself: it asks a validating resolver (unbound) and believes the resolver's
AD bit ("authentic data", RFC 4035 3.2.3).  That bit travels unsigned, so it
is worth something only from a resolver on this host, over loopback, where no
one in the path can set it (RFC 7672 2.1.1; RFC 6698 4.1): `trusted` is true
only when every configured resolver address is a loopback address.  An
untrusted resolver's answers are still used (MTA-STS needs TXT records, which
do not need DNSSEC), but every answer counts as unvalidated, so DANE never
applies.

The interface (`PolicyResolver`) is kept small on purpose, so that the queue
manager's one shared resolver can stand in for this one: `txt`, `tlsa`, and
`lookup` for the MX and address records whose validation DANE also needs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver

from common.config import parse_hostport

log = logging.getLogger("tlsdns")


class LookupFailed(Exception):
    """The resolver gave no usable answer (SERVFAIL, which a validating resolver
    also gives for a bogus signature, or a timeout): nothing can be concluded."""


@dataclass(frozen=True)
class Answer:
    """Records in zone-file text, whether the name exists, and whether a trusted
    validating resolver vouched for the answer (records or their absence)."""

    records: list[str]
    validated: bool
    exists: bool = True
    # Records present but unreadable (a TLSA digest of the wrong length: dnspython
    # refuses to parse it), each as the parser's complaint.  RFC 7672 3.1: unusable,
    # not an error of the whole answer.
    malformed: tuple[str, ...] = ()


class PolicyResolver(Protocol):
    """What outbound TLS policy asks of DNS (see the module docstring)."""

    @property
    def trusted(self) -> bool:
        """Whether `validated` can ever be true: a validating resolver on this host."""
        ...

    async def lookup(self, name: str, rdtype: str) -> Answer:
        """The records of one type; raises LookupFailed."""
        ...

    async def tlsa(self, name: str) -> Answer:
        """TLSA records at `name` (e.g. _25._tcp.mx.example.net); raises LookupFailed."""
        ...

    async def txt(self, name: str) -> list[str]:
        """Each TXT record as one string (its character-strings joined); [] when there is
        none; raises LookupFailed."""
        ...


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class DNSSECResolver:
    """PolicyResolver over dnspython's asynchronous resolver.

    Queries carry the DO bit (EDNS0) and the AD bit (RFC 6840 5.7: "tell me if
    you validated it"); answers are cached for their TTL, AD bit included.
    """

    def __init__(self, nameservers: list[str], timeout: float) -> None:
        if nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for ns in nameservers:
                host, port = parse_hostport(ns, 53)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            r.nameservers = servers
        else:
            r = dns.asyncresolver.Resolver()  # the system's (/etc/resolv.conf)
        r.lifetime = timeout
        r.use_edns(0, dns.flags.DO, 1232)
        r.flags = dns.flags.RD | dns.flags.AD
        r.cache = dns.resolver.LRUCache(4096)
        self.resolver = r
        addresses = [ns.address if isinstance(ns, dns.nameserver.Do53Nameserver) else str(ns) for ns in r.nameservers]
        self.trusted = bool(addresses) and all(is_loopback(a) for a in addresses)
        self.addresses = addresses
        self.timeout = timeout
        self.servers = [(ns.address, ns.port) for ns in r.nameservers if isinstance(ns, dns.nameserver.Do53Nameserver)]

    async def lookup(self, name: str, rdtype: str) -> Answer:
        rdatas, validated, exists = await self._resolve(name, rdtype)
        return Answer([rd.to_text() for rd in rdatas], validated, exists)

    async def _resolve(self, name: str, rdtype: str) -> tuple[list[dns.rdata.Rdata], bool, bool]:
        try:
            answer = await self.resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.responses().values())  # type: ignore[no-untyped-call]
            return [], bool(responses) and self._validated(responses[-1]), False
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.NoAnswer) as exc:
            raise LookupFailed(f"{name} {rdtype}: {type(exc).__name__}") from exc
        except dns.exception.DNSException as exc:  # a malformed name or answer
            raise LookupFailed(f"{name} {rdtype}: {exc}") from exc
        rdatas = list(answer.rrset) if answer.rrset is not None else []
        return rdatas, self._validated(answer.response), True

    def _validated(self, response: dns.message.Message) -> bool:
        return self.trusted and bool(response.flags & dns.flags.AD)

    async def tlsa(self, name: str) -> Answer:
        """TLSA records, read so that a malformed one spoils only itself.

        dnspython's resolver refuses a whole answer with one malformed TLSA record
        in it (a SHA-256 of 31 octets) and retries until it times out, which
        would read as "lookup failed" and hold the mail for good.  So this one
        query is made by hand and parsed with `continue_on_error`."""
        query = dns.message.make_query(name, "TLSA", want_dnssec=True, use_edns=0, payload=1232)
        query.flags |= dns.flags.AD
        problem = "no nameserver"
        try:
            async with asyncio.timeout(self.timeout):
                for address, port in self.servers:
                    try:
                        response = await _exchange(query, address, port)
                    except (OSError, EOFError, ValueError, dns.exception.DNSException) as exc:
                        problem = f"{address}:{port}: {type(exc).__name__}"
                        continue
                    rcode = response.rcode()
                    if rcode == dns.rcode.NXDOMAIN:
                        return Answer([], self._validated(response), exists=False)
                    if rcode != dns.rcode.NOERROR:
                        problem = f"{address}:{port} answered {dns.rcode.to_text(rcode)}"
                        continue
                    records = [rd.to_text() for rrset in response.answer if rrset.rdtype == dns.rdatatype.TLSA
                               for rd in rrset]
                    malformed = tuple(str(e.exception) for e in response.errors)
                    return Answer(records, self._validated(response), malformed=malformed)
        except TimeoutError:
            problem = "timeout"
        raise LookupFailed(f"{name} TLSA: {problem}")

    async def txt(self, name: str) -> list[str]:
        rdatas, _, _ = await self._resolve(name, "TXT")
        # A record's character-strings are joined without spaces (RFC 8461 3.1, RFC 7208 3.3).
        return [
            b"".join(rd.strings).decode("utf-8", "replace")
            for rd in rdatas if isinstance(rd, dns.rdtypes.ANY.TXT.TXT)
        ]


async def _exchange(query: dns.message.Message, address: str, port: int) -> dns.message.Message:
    """One query over UDP, again over TCP if the answer was truncated; parsed tolerantly."""
    loop = asyncio.get_running_loop()
    wire = query.to_wire()
    received: asyncio.Future[bytes] = loop.create_future()

    class _Protocol(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not received.done() and data[:2] == wire[:2]:  # our query's id
                received.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not received.done():
                received.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(_Protocol, remote_addr=(address, port))
    try:
        transport.sendto(wire)
        answer = await received
    finally:
        transport.close()
    response = dns.message.from_wire(answer, continue_on_error=True)
    if not response.flags & dns.flags.TC:
        return response
    reader, writer = await asyncio.open_connection(address, port)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        return dns.message.from_wire(await reader.readexactly(size), continue_on_error=True)
    finally:
        writer.close()
