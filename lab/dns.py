"""The lab's DNS server: authoritative answers for the lab domains, over UDP and TCP.

Answers as a real authoritative server does (RFC 1034, RFC 2308): the AA bit;
a name not in the zone is NXDOMAIN, a name without the asked type is NODATA
(NOERROR, empty answer); both carry an SOA so resolvers may cache the absence.
Names that only exist as parents of listed names ("test." when "mx.accepts.test."
is listed) exist without records (RFC 8020).  Every query is logged, so the
learner sees the MX lookup and the A lookups that follow it.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("lab.dns")

TTL = 60


class Zone:
    def __init__(self, records: dict[str, dict[str, list[str]]]) -> None:
        self.rrsets: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self.existing: set[dns.name.Name] = set()
        for text, types in records.items():
            name = dns.name.from_text(text)
            self.rrsets[name] = {
                dns.rdatatype.from_text(t): dns.rrset.from_text_list(name, TTL, dns.rdataclass.IN, t, values)
                for t, values in types.items()
            }
            while name != dns.name.root:
                self.existing.add(name)
                name = name.parent()

    def soa(self, qname: dns.name.Name) -> dns.rrset.RRset:
        apex = dns.name.Name(qname.labels[-3:]) if len(qname.labels) > 2 else qname
        return dns.rrset.from_text(apex, TTL, "IN", "SOA", f"ns.{apex} hostmaster.{apex} 1 3600 600 86400 {TTL}")

    def answer(self, wire: bytes, proto: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None  # not DNS: stay silent, as a server under garbage would
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return None
        q = query.question[0]
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        log.info("%s %s? (%s)", q.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(q.rdtype), proto)
        name = q.name.canonicalize()
        found = self.rrsets.get(name, {}).get(q.rdtype)
        if found is not None:
            response.answer.append(found)
            if q.rdtype == dns.rdatatype.MX:
                # The exchanges' addresses ride along, as real servers send them.
                for rd in found:
                    extra = self.rrsets.get(rd.exchange, {}).get(dns.rdatatype.A)
                    if extra is not None:
                        response.additional.append(extra)
        else:
            if name not in self.existing:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self.soa(name))
        return response.to_wire()


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.zone.answer(data, "udp")
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


async def _tcp(zone: Zone, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            out = zone.answer(await reader.readexactly(size), "tcp")
            if out is None:
                break
            writer.write(struct.pack("!H", len(out)) + out)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(zone: Zone, host: str, port: int) -> tuple[asyncio.DatagramTransport, asyncio.Server]:
    """Answer on host:port over UDP and TCP (clients retry over TCP when an answer is truncated)."""
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(lambda: _UDP(zone), local_addr=(host, port))
    tcp = await asyncio.start_server(lambda r, w: _tcp(zone, r, w), host, port)
    return udp, tcp
