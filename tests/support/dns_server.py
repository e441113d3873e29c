"""A real DNS server on a loopback port, for testing the MTA's MX routing.

The MTA resolves next hops with dnspython's async resolver against the
nameservers in ``[dns] nameservers`` ("host:port").  Tests point that setting at
one of the servers below, so every lookup crosses a real UDP or TCP socket and
the code under test may live in any process (the real qmgr daemon included).

``DNSServer(records)`` (the must-have) is a small authoritative server written
with dnspython.  It runs in its own subprocess (this file run as a script), so
it keeps answering while the test process blocks, and it dies with its parent.
``records`` maps a name to its records or to a failure mode::

    {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"]},
        "nomx.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},      # A/AAAA fallback
        "nullmx.test": {"MX": [(0, ".")]},                       # RFC 7505 null MX
        "alias.test": {"CNAME": "example.test"},                 # chased like a real server
        "txt.test": {"TXT": ['"v=spf1 -all"']},                  # any type, in zone-file text
        "servfail.test": "SERVFAIL",                             # also "REFUSED", "NXDOMAIN"
        "timeout.test": "TIMEOUT",                               # never answered
    }

Answers follow RFC 1034/2308: the AA bit is set; a name not in ``records``
answers NXDOMAIN, and a name that exists without the asked type answers NOERROR
with no answer (NODATA); both carry an SOA in the authority section.  Names that
only exist as parents of listed names ("example.test" when only
"mx1.example.test" is listed: an empty non-terminal) answer NODATA, not
NXDOMAIN, as RFC 8020 requires of a real server.  MX answers carry the A/AAAA
of their exchanges in the additional section when known.  UDP answers larger
than 512 octets (or the client's EDNS size) are truncated (TC), so the client
retries over TCP; ``udp_truncate=True`` forces that for every UDP answer.

Scripted misbehaviour, for the tests of a resolver that must not stall:
``delays={"slow.test": 2.5}`` answers that name (and every type of it) only
after 2.5 seconds, over UDP and TCP alike, while every other name is answered
at once; ``misdirect={"asked.test": "other.test"}`` answers a query for the
first name with the records of the second, under the second's name (an answer
for a name other than the one asked, which a resolver must not take).
``set_records()`` keeps both unless given new ones.

Handle: ``.host``, ``.port``, ``.address`` ("127.0.0.1:PORT", the form of
``[dns] nameservers``), ``.pid``.  ``set_records()`` takes effect for the next
query (the server re-reads its JSON zone file whenever the file changes);
``queries()`` lists the (name, type) pairs asked so far, e.g.
``("example.test", "MX")``, so a test can assert that a lookup really happened
(``query_log()`` adds udp/tcp and time; ``clear_queries()`` starts afresh).
As with real servers, name compression may copy the question's letter case
into names in the answer: compare names case-insensitively.

``DnsmasqServer(records)`` offers the same interface with dnsmasq
(Debian package dnsmasq-base) as a second, independent implementation; see its
docstring for what it cannot express.

Standalone use (e.g. under supervisord next to a development suite)::

    python -m tests.support.dns_server --port 5353 --zone-file zone.json

where zone.json is ``{"records": {...}}`` as above (tuples as JSON lists).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = [
    "DNSServer",
    "DnsmasqServer",
    "MODES",
    "Records",
    "normalize_records",
]

#: What a name may map to instead of records.
MODES = frozenset({"SERVFAIL", "TIMEOUT", "REFUSED", "NXDOMAIN"})

#: name -> {"TYPE": [values]} or a mode.  Values are zone-file text ("127.0.0.2",
#: "10 mx1.example.test") or, for MX, (preference, exchange) pairs; a single
#: value may stand without its list.
Records = Mapping[str, Mapping[str, Any] | str]

#: Canonical, JSON-ready form: absolute lower-case names, rdata in canonical text.
NormalRecords = dict[str, dict[str, list[str]] | str]

# The readiness probe asks for this name; the server answers it without logging
# it, so queries() shows only what the code under test asked.
PROBE_NAME = "dns-server-probe.invalid."

_READY = "READY"

# Seconds the watchdog gives dnsmasq to exit after SIGTERM, and the test
# process gives the watchdog; the second must be the larger (see _supervise).
_CHILD_GRACE = 2.0
_WATCHDOG_GRACE = 10.0


def _absolute(name: str) -> str:
    """'Example.Test' -> 'example.test.'; names in records are always absolute."""
    return dns.name.from_text(name, origin=dns.name.root).to_text().lower()


def _value_text(rdtype: str, value: Any) -> str:
    # MX is the type the tests use most, so it gets the friendliest spelling.
    if rdtype == "MX" and isinstance(value, tuple | list):
        preference, exchange = value
        return f"{int(preference)} {exchange}"
    if not isinstance(value, str):
        raise ValueError(f"{rdtype} value must be text, got {value!r}")
    return value


def normalize_records(records: Records) -> NormalRecords:
    """Validate ``records`` and return them in canonical form.

    Done in the test process, so that a typo fails the test with a clear
    message instead of silently breaking the server process.
    """
    out: NormalRecords = {}
    for raw_name, spec in records.items():
        name = _absolute(raw_name)
        if name in out:
            raise ValueError(f"{raw_name!r} listed twice (names are case-insensitive)")
        if not isinstance(spec, str | Mapping):
            raise ValueError(f"{raw_name!r}: expected a mode or {{type: values}}, got {spec!r}")
        if isinstance(spec, str):
            if spec.upper() not in MODES:
                raise ValueError(f"{raw_name!r}: unknown mode {spec!r}; use one of {sorted(MODES)}")
            out[name] = spec.upper()
            continue
        types: dict[str, list[str]] = {}
        for raw_type, values in spec.items():
            try:
                rdtype = dns.rdatatype.from_text(raw_type)
            except dns.exception.DNSException as exc:
                raise ValueError(f"{raw_name!r}: unknown type {raw_type!r}") from exc
            type_text = dns.rdatatype.to_text(rdtype)
            if isinstance(values, str) or (
                type_text == "MX" and isinstance(values, tuple) and len(values) == 2
                and isinstance(values[0], int)
            ):
                values = [values]
            texts: list[str] = []
            for value in values:
                # Parsing with the root origin, not relativized, makes every
                # name in the rdata absolute ("." stays the root, as a null MX
                # needs), and to_text() gives the canonical spelling.
                try:
                    rdata = dns.rdata.from_text(
                        dns.rdataclass.IN,
                        rdtype,
                        _value_text(type_text, value),
                        origin=dns.name.root,
                        relativize=False,
                    )
                except dns.exception.DNSException as exc:
                    raise ValueError(f"{raw_name!r} {type_text} {value!r}: {exc}") from exc
                texts.append(rdata.to_text())
            if type_text == "CNAME" and (len(texts) != 1 or len(spec) != 1):
                raise ValueError(f"{raw_name!r}: a CNAME must be the name's only record")
            types[type_text] = texts
        out[name] = types
    return out


# --------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------


class _Zone:
    """The records of the zone file, re-read whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self.ttl = 60
        self.udp_truncate = False
        self.delays: dict[dns.name.Name, float] = {}
        self.misdirect: dict[dns.name.Name, dns.name.Name] = {}
        self.rrsets: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self.modes: dict[dns.name.Name, str] = {}
        self.existing: set[dns.name.Name] = set()
        self.refresh()

    def refresh(self) -> None:
        # A stat per query is cheap, and the writer replaces the file
        # atomically (new inode), so a change is never missed and a half
        # written file is never read.
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        data = json.loads(self.path.read_text(encoding="utf-8"))
        ttl = int(data.get("ttl", 60))
        records = normalize_records(data.get("records", {}))
        # Build everything first and swap at the end: a bad file leaves the
        # previous records (and stamp) in place, so it is retried next time.
        rrsets: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        modes: dict[dns.name.Name, str] = {}
        existing: set[dns.name.Name] = set()
        for text, spec in records.items():
            name = dns.name.from_text(text)
            if isinstance(spec, str):
                modes[name] = spec
                continue
            rrsets[name] = {
                dns.rdatatype.from_text(t): dns.rrset.from_text_list(
                    name, ttl, dns.rdataclass.IN, t, values
                )
                for t, values in spec.items()
            }
            # Every ancestor of a listed name exists (an empty non-terminal).
            while True:
                existing.add(name)
                if name == dns.name.root:
                    break
                name = name.parent()
        self.ttl = ttl
        self.udp_truncate = bool(data.get("udp_truncate", False))
        self.delays = {dns.name.from_text(n): float(v) for n, v in data.get("delays", {}).items()}
        self.misdirect = {
            dns.name.from_text(n): dns.name.from_text(t) for n, t in data.get("misdirect", {}).items()
        }
        self.rrsets, self.modes, self.existing = rrsets, modes, existing
        self._stamp = stamp

    def soa(self, qname: dns.name.Name) -> dns.rrset.RRset:
        """The SOA for negative answers: an explicit one if listed, else made up."""
        candidate = qname
        while True:
            rrs = self.rrsets.get(candidate, {})
            if dns.rdatatype.SOA in rrs:
                return rrs[dns.rdatatype.SOA]
            if candidate == dns.name.root:
                break
            candidate = candidate.parent()
        # No SOA listed: call the registered-domain-like last two labels the
        # zone apex.  Resolvers only use the SOA's minimum (negative TTL).
        labels = qname.labels[-3:] if len(qname.labels) > 3 else qname.labels
        apex = dns.name.Name(labels)
        mname = dns.name.from_text("ns", origin=apex)  # "ns." for the root itself
        rname = dns.name.from_text("hostmaster", origin=apex)
        return dns.rrset.from_text(
            apex, self.ttl, "IN", "SOA",
            f"{mname} {rname} 1 3600 600 86400 {self.ttl}",
        )


class _Responder:
    """Builds the answer to one query; shared by the UDP and TCP listeners."""

    def __init__(self, zone: _Zone, log_path: Path | None) -> None:
        self.zone = zone
        # O_APPEND makes each short os.write() land whole at the end, even if
        # the test process truncates the file meanwhile (clear_queries()).
        self.log_fd = (
            os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if log_path is not None
            else None
        )

    def _log(self, qname: dns.name.Name, qtype: int, proto: str) -> None:
        if self.log_fd is None:
            return
        entry = {
            "name": qname.to_text(omit_final_dot=True).lower() or ".",
            "type": dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype)),
            "proto": proto,
            "time": time.time(),
        }
        os.write(self.log_fd, (json.dumps(entry) + "\n").encode())

    def delay(self, wire: bytes) -> float:
        """Seconds to wait before answering ``wire`` (``delays``); 0 for most names."""
        try:
            self.zone.refresh()
            question = dns.message.from_wire(wire).question
        except Exception:
            return 0.0
        return self.zone.delays.get(question[0].name, 0.0) if question else 0.0

    def respond(self, wire: bytes, proto: str) -> bytes | None:
        """The wire answer to ``wire``, or None to stay silent."""
        try:
            return self._respond(wire, proto)
        except Exception:
            # A bug here must not kill the server or look like a timeout:
            # say SERVFAIL and leave the traceback on stderr.
            traceback.print_exc()
            return _servfail(wire)

    def _respond(self, wire: bytes, proto: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return _formerr(wire)
        if query.flags & dns.flags.QR:
            return None  # a response sent to us: never answer those (loops)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        if question.name == dns.name.from_text(PROBE_NAME):
            return response.to_wire()
        self._log(question.name, question.rdtype, proto)
        try:
            self.zone.refresh()
        except (OSError, ValueError):
            # A broken zone file must show up as a failure, not as stale data.
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        # A misdirected name is answered with another name's records, under that name.
        answered_name = self.zone.misdirect.get(question.name, question.name)
        if not self._fill(response, answered_name, question.rdtype):
            return None
        if proto == "tcp":
            # Any size over TCP: dnspython would otherwise cap it at the query's EDNS payload.
            return response.to_wire(max_size=65535)
        if self.zone.udp_truncate:
            response.answer = []
            response.authority = []
            response.additional = []
            response.flags |= dns.flags.TC
            return response.to_wire()
        # Without EDNS a UDP answer may not exceed 512 octets (RFC 1035 4.2.1).
        limit = query.payload if query.edns >= 0 else 512
        with contextlib.suppress(dns.exception.TooBig):
            return response.to_wire(max_size=limit)
        # Additional records may be dropped without telling (RFC 2181 9) ...
        response.additional = []
        with contextlib.suppress(dns.exception.TooBig):
            return response.to_wire(max_size=limit)
        # ... the answer may not: set TC so that the client asks over TCP.
        response.answer = []
        response.authority = []
        response.flags |= dns.flags.TC
        return response.to_wire()

    def _fill(self, response: dns.message.Message, qname: dns.name.Name, qtype: int) -> bool:
        """Put the answer into ``response``; False means do not answer at all."""
        zone = self.zone
        name = qname
        for _ in range(8):  # CNAME chains longer than this are loops
            mode = zone.modes.get(name)
            if mode == "TIMEOUT":
                # Silent for the asked name; a CNAME chain that ends in one
                # is answered as far as it goes (the target is "elsewhere").
                return bool(name != qname)
            if mode == "SERVFAIL":
                response.set_rcode(dns.rcode.SERVFAIL)
                return True
            if mode == "REFUSED":
                response.set_rcode(dns.rcode.REFUSED)
                return True
            rrsets = zone.rrsets.get(name)
            if mode == "NXDOMAIN" or (rrsets is None and name not in zone.existing):
                response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(zone.soa(name))
                return True
            rrsets = rrsets or {}
            if qtype == dns.rdatatype.ANY and rrsets:
                response.answer.extend(rrsets.values())
                return True
            if qtype in rrsets:
                response.answer.append(rrsets[qtype])
                if qtype == dns.rdatatype.MX:
                    self._glue(response, rrsets[qtype])
                return True
            cname = rrsets.get(dns.rdatatype.CNAME)
            if cname is None:
                response.authority.append(zone.soa(name))  # NODATA
                return True
            response.answer.append(cname)
            name = cname[0].target
        response.set_rcode(dns.rcode.SERVFAIL)
        return True

    def _glue(self, response: dns.message.Message, mx: dns.rrset.RRset) -> None:
        # Real authoritative servers add the exchanges' addresses they know;
        # the resolver under test must still work if it ignores them.
        for rdata in mx:
            known = self.zone.rrsets.get(rdata.exchange, {})
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                if rdtype in known:
                    response.additional.append(known[rdtype])


def _error_answer(wire: bytes, rcode: int) -> bytes | None:
    if len(wire) < 12:
        return None  # not even a header: nothing to answer to
    # Keep the id and opcode so the client can match the answer to its query.
    flags = dns.flags.QR | (int.from_bytes(wire[2:4], "big") & 0x7800)
    return wire[0:2] + (flags | rcode).to_bytes(2, "big") + bytes(8)


def _formerr(wire: bytes) -> bytes | None:
    return _error_answer(wire, dns.rcode.FORMERR)


def _servfail(wire: bytes) -> bytes | None:
    # With the question copied, when the query parses, so that clients which
    # insist on a matching question still take the answer.
    try:
        response = dns.message.make_response(dns.message.from_wire(wire))
        response.set_rcode(dns.rcode.SERVFAIL)
        return response.to_wire()
    except Exception:
        return _error_answer(wire, dns.rcode.SERVFAIL)


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, responder: _Responder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport is not registered as a
        # DatagramTransport subclass on every Python version: cast, not assert.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        delay = self.responder.delay(data)
        if delay > 0:
            # Later, without holding up the answers to every other name meanwhile.
            asyncio.get_running_loop().call_later(delay, self._answer, data, addr)
        else:
            self._answer(data, addr)

    def _answer(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        answer = self.responder.respond(data, "udp")
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from a client that went away must not stop the server.
        pass


async def _tcp_client(
    responder: _Responder, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            length = int.from_bytes(await reader.readexactly(2), "big")
            wire = await reader.readexactly(length)
            delay = responder.delay(wire)
            if delay > 0:
                await asyncio.sleep(delay)
            answer = responder.respond(wire, "tcp")
            if answer is not None:
                # TIMEOUT over TCP: keep the connection open and say nothing.
                writer.write(len(answer).to_bytes(2, "big") + answer)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _bind(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets on the same port; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((host, port))
            # SO_REUSEADDR lets a restarted server take its port back while old
            # connections sit in TIME_WAIT; it does not allow two listeners.
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(64)
            return udp, tcp
        except OSError as exc:
            udp.close()
            tcp.close()
            # A free UDP port may be taken for TCP: try another, unless the
            # caller asked for this very port.
            if exc.errno != errno.EADDRINUSE or port != 0:
                raise
    raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")


async def _serve(args: argparse.Namespace) -> None:
    zone = _Zone(Path(args.zone_file))
    responder = _Responder(zone, Path(args.query_log) if args.query_log else None)
    udp_sock, tcp_sock = _bind(args.host, args.port)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _UDP(responder), sock=udp_sock)
    server = await asyncio.start_server(
        lambda r, w: _tcp_client(responder, r, w), sock=tcp_sock
    )
    stop = asyncio.Event()
    orphaned = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if args.exit_on_stdin_eof:
        # The parent holds our stdin open; if it dies (even by kill -9) we see
        # EOF and exit instead of lingering as an orphan on the port.
        def on_stdin() -> None:
            if not os.read(sys.stdin.fileno(), 4096):
                loop.remove_reader(sys.stdin.fileno())
                orphaned.set()
                stop.set()

        loop.add_reader(sys.stdin.fileno(), on_stdin)
    print(f"{_READY} {args.host} {udp_sock.getsockname()[1]}", flush=True)
    await stop.wait()
    transport.close()
    server.close()
    if orphaned.is_set() and args.owned_dir:
        # Nobody else is left to remove our temporary directory.
        shutil.rmtree(args.owned_dir, ignore_errors=True)


def _supervise(owned_dir: str, command: Sequence[str]) -> int:
    """Run ``command`` until it exits, we are told to stop, or stdin closes.

    dnsmasq cannot notice that the test process died, and it drops root for
    "nobody", which clears a parent-death signal; so DnsmasqServer runs it
    under this small watchdog, which kills it when our stdin pipe closes
    (and then removes ``owned_dir``, the server's temporary directory).
    """
    # Handlers first: a SIGTERM that arrived between starting the child and
    # installing them would kill us and orphan the child.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    child = subprocess.Popen(list(command), stdin=subprocess.DEVNULL)

    orphaned = threading.Event()

    def watch_stdin() -> None:
        while os.read(0, 4096):
            pass
        orphaned.set()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while child.poll() is None and not stop.wait(0.05):
        pass
    if child.poll() is None:
        child.terminate()
        try:
            # Well under the parent's patience (_WATCHDOG_GRACE), so that we,
            # not the parent, are the ones to SIGKILL a dnsmasq that ignores
            # SIGTERM; the parent killing us first would orphan it.
            child.wait(_CHILD_GRACE)
        except subprocess.TimeoutExpired:
            print(f"watchdog: dnsmasq {child.pid} ignored SIGTERM; killing it", file=sys.stderr)
            child.kill()
            child.wait()
    if orphaned.is_set() and owned_dir:
        shutil.rmtree(owned_dir, ignore_errors=True)
    return child.returncode


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--supervise"]:  # --supervise OWNED_DIR COMMAND...
        sys.exit(_supervise(argv[1], argv[2:]))
    parser = argparse.ArgumentParser(description="A small authoritative DNS server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--zone-file", required=True, help='JSON: {"records": {...}}')
    parser.add_argument("--query-log", help="append one JSON line per query here")
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    parser.add_argument("--owned-dir", help="remove this directory on exit by stdin EOF")
    asyncio.run(_serve(parser.parse_args(argv)))


# --------------------------------------------------------------------------
# The test-side handles
# --------------------------------------------------------------------------


def _write_atomically(path: Path, text: str) -> None:
    # Write a new file and rename it over the old one: the server never sees a
    # half-written zone, and the new inode guarantees it notices the change.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _probe(host: str, port: int, timeout: float, token: str | None = None) -> None:
    """Raise unless the server answers over both UDP and TCP.

    With ``token``, the answer must be the probe's TXT record holding it:
    proof that the server answering is ours and not another one that took
    the port meanwhile.
    """
    query = dns.message.make_query(PROBE_NAME, "TXT" if token else "A")
    for answer in (
        dns.query.udp(query, host, port=port, timeout=timeout),
        dns.query.tcp(query, host, port=port, timeout=timeout),
    ):
        if token is not None:
            texts = [b"".join(r.strings).decode() for rrset in answer.answer for r in rrset]
            if texts != [token]:
                raise _NotOurs(f"port {port} is answered by another server")


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Terminate ``proc`` by its pid and reap it (no zombie, no warning)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class DNSServer:
    """An authoritative DNS server (dnspython) in a subprocess on a loopback port.

    Use as a context manager::

        with DNSServer({"example.test": {"MX": [(10, "mx.example.test")]}}) as dns_server:
            config_nameservers = [dns_server.address]      # "127.0.0.1:PORT"
            ...
            assert ("example.test", "MX") in dns_server.queries()
    """

    def __init__(
        self,
        records: Records,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: int = 60,
        udp_truncate: bool = False,
        start_timeout: float = 10.0,
        delays: Mapping[str, float] | None = None,
        misdirect: Mapping[str, str] | None = None,
    ) -> None:
        self._records = normalize_records(records)
        self._delays = {_absolute(n): float(v) for n, v in (delays or {}).items()}
        self._misdirect = {_absolute(n): _absolute(t) for n, t in (misdirect or {}).items()}
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._ttl = ttl
        self._udp_truncate = udp_truncate
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("already started")
        self._dir = Path(tempfile.mkdtemp(prefix="mailroom-dns-"))
        self._write_zone()
        self._query_log.touch()
        stderr_path = self._dir / "stderr"
        with open(stderr_path, "wb") as stderr:
            # Run this file as a script, not with -m, so the server starts the
            # same way whatever the current directory and sys.path are.
            self._proc = subprocess.Popen(
                [
                    sys.executable, os.path.abspath(__file__),
                    "--host", self._host,
                    "--port", str(self._requested_port),
                    "--zone-file", str(self._zone_file),
                    "--query-log", str(self._query_log),
                    "--exit-on-stdin-eof",
                    "--owned-dir", str(self._dir),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                close_fds=True,
            )
        try:
            self._port = self._wait_ready(stderr_path)
            _probe(self._host, self._port, timeout=self._start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, stderr_path: Path) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + self._start_timeout
        buffer = b""
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"DNS server not ready after {self._start_timeout}s")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self._proc.wait()
                    raise RuntimeError(
                        f"DNS server exited with {self._proc.returncode}: "
                        + stderr_path.read_text(errors="replace")[-2000:]
                    )
                buffer += chunk
        word, _host, port = buffer.split(b"\n", 1)[0].decode().split()
        if word != _READY:
            raise RuntimeError(f"unexpected line from DNS server: {buffer!r}")
        return int(port)

    def stop(self) -> None:
        if self._proc is not None:
            _stop_process(self._proc)
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where it listens ------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("DNS server not started")
        return self._port

    @property
    def address(self) -> str:
        """'127.0.0.1:PORT', the form ``[dns] nameservers`` takes."""
        return _format_address(self.host, self.port)

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("DNS server not started")
        return self._proc.pid

    # -- what it answers and was asked -----------------------------------

    @property
    def records(self) -> NormalRecords:
        """The records served now, in canonical form (absolute names)."""
        copy: NormalRecords = json.loads(json.dumps(self._records))  # a deep copy
        return copy

    def set_records(
        self, records: Records, *, udp_truncate: bool | None = None, delays: Mapping[str, float] | None = None,
        misdirect: Mapping[str, str] | None = None,
    ) -> None:
        """Serve ``records`` from the next query on (the old ones are dropped)."""
        self._records = normalize_records(records)
        if udp_truncate is not None:
            self._udp_truncate = udp_truncate
        if delays is not None:
            self._delays = {_absolute(n): float(v) for n, v in delays.items()}
        if misdirect is not None:
            self._misdirect = {_absolute(n): _absolute(t) for n, t in misdirect.items()}
        if self._dir is not None:
            self._write_zone()

    def queries(self) -> list[tuple[str, str]]:
        """(name, type) of every query so far, in order: ("example.test", "MX")."""
        return [(e["name"], e["type"]) for e in self.query_log()]

    def query_log(self) -> list[dict[str, Any]]:
        """Every query so far with its details: name, type, proto (udp/tcp), time."""
        if self._dir is None:
            return []
        lines = self._query_log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def clear_queries(self) -> None:
        if self._dir is not None:
            self._query_log.write_bytes(b"")

    # -- files -----------------------------------------------------------

    @property
    def _zone_file(self) -> Path:
        assert self._dir is not None
        return self._dir / "zone.json"

    @property
    def _query_log(self) -> Path:
        assert self._dir is not None
        return self._dir / "queries.jsonl"

    def _write_zone(self) -> None:
        data = {
            "ttl": self._ttl, "udp_truncate": self._udp_truncate, "records": self._records,
            "delays": self._delays, "misdirect": self._misdirect,
        }
        _write_atomically(self._zone_file, json.dumps(data, indent=1))


# --------------------------------------------------------------------------
# dnsmasq
# --------------------------------------------------------------------------

DNSMASQ = "/usr/sbin/dnsmasq"

# "query[MX] example.test from 127.0.0.1" in dnsmasq's --log-queries output.
_DNSMASQ_QUERY = re.compile(r"query\[(?P<type>[A-Z0-9]+)\] (?P<name>\S+) from ")


class DnsmasqServer:
    """The same interface as :class:`DNSServer`, served by a real dnsmasq.

    dnsmasq (Debian package dnsmasq-base) runs unprivileged-friendly: in the
    foreground, with no config file, no /etc/hosts, no resolv.conf, no DHCP,
    bound to one loopback address and port, its pid file and query log in a
    temporary directory.  ``--local=/#/`` makes it answer every name itself:
    listed names from ``--host-record``/``--mx-host``/``--cname``/``--txt-record``,
    everything else NXDOMAIN, a listed name without the asked type NODATA.

    Differences from :class:`DNSServer`, inherent to dnsmasq:

    - Types: A, AAAA, MX, CNAME and TXT only (ValueError otherwise).
    - Negative answers (NXDOMAIN, NODATA) carry no SOA and no AA bit: dnsmasq
      is not authoritative outside its --auth-zone mode.
    - TXT strings may not contain commas (its --txt-record separator).
    - SERVFAIL, TIMEOUT and REFUSED cannot be said by dnsmasq itself: those
      names (and their subdomains) are forwarded (``--server=/name/...``) to a
      helper :class:`DNSServer` that answers them that way, and dnsmasq
      passes its answer (or its silence) on.  The helper's queries are not in
      ``queries()``; dnsmasq's own log is.
    - ``set_records()`` restarts dnsmasq on the same port (it cannot reload
      MX records); a query sent during the restart may go unanswered.
    - ``udp_truncate`` is not offered.

    ``pid`` is that of a small watchdog (this file, ``--supervise``) that
    runs dnsmasq and stops it when told to or when the test process dies;
    ``dnsmasq_pid`` is dnsmasq's own.  dnsmasq drops root for "nobody".
    """

    def __init__(
        self,
        records: Records,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: int = 60,
        start_timeout: float = 10.0,
        binary: str = DNSMASQ,
    ) -> None:
        self._records = normalize_records(records)
        self._host = host
        self._port = port or None
        self._fixed_port = port != 0
        self._ttl = ttl
        self._start_timeout = start_timeout
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._helper: DNSServer | None = None
        self._token = f"dnsmasq-{os.getpid()}-{id(self)}-{time.time_ns()}"
        self._arguments(self._records)  # reject unsupported types before starting

    @staticmethod
    def available(binary: str = DNSMASQ) -> bool:
        return os.access(binary, os.X_OK)

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Self:
        if self._dir is not None:
            raise RuntimeError("already started")
        if not self.available(self._binary):
            raise FileNotFoundError(f"{self._binary} not found (Debian package dnsmasq-base)")
        self._dir = Path(tempfile.mkdtemp(prefix="mailroom-dnsmasq-"))
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        assert self._dir is not None
        self._sync_helper()
        attempts = 1 if self._fixed_port else 20
        for attempt in range(attempts):
            if not self._fixed_port and (self._port is None or attempt > 0):
                from tests.support.ports import free_port  # here: this file also runs as a script

                self._port = free_port(self._host, udp=True)  # dnsmasq cannot pick one
            try:
                self._start_dnsmasq()
                return
            except _PortTaken as exc:
                if self._fixed_port:
                    raise OSError(errno.EADDRINUSE, f"dnsmasq: {exc}".strip()) from exc
        raise OSError(errno.EADDRINUSE, "dnsmasq found no free port")

    def _start_dnsmasq(self) -> None:
        assert self._dir is not None and self._port is not None
        log = self._dir / "dnsmasq.log"
        stderr_path = self._dir / "stderr"
        args = [
            self._binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",  # not /etc/dnsmasq.conf
            "--no-resolv",
            "--no-poll",
            "--no-hosts",
            f"--listen-address={self._host}",
            "--bind-interfaces",  # only this address, not 0.0.0.0:port
            f"--port={self._port}",
            f"--pid-file={self._dir / 'dnsmasq.pid'}",
            "--local=/#/",  # answer every name from local data, never forward
            f"--local-ttl={self._ttl}",
            "--cache-size=0",  # set_records() and forwarded failures must not be cached
            "--log-queries",
            f"--log-facility={log}",
            f"--txt-record={PROBE_NAME.rstrip('.')},{self._token}",
            *self._arguments(self._records),
        ]
        with open(stderr_path, "wb") as stderr:
            # Under our watchdog (see _supervise), holding its stdin, so that
            # dnsmasq goes away even if this process is killed with -9.
            self._proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--supervise", str(self._dir), *args],
                stdin=subprocess.PIPE,
                stdout=stderr,
                stderr=stderr,
                close_fds=True,
            )
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._proc.poll() is not None:
                _stop_process(self._proc)  # reaped already; closes our pipe
                self._proc = None
                message = stderr_path.read_text(errors="replace")
                if "in use" in message:
                    raise _PortTaken(message)
                raise RuntimeError(f"dnsmasq exited: {message[-2000:]}")
            try:
                _probe(self._host, self._port, timeout=0.2, token=self._token)
                return
            except (_NotOurs, dns.exception.DNSException, OSError):
                # Not up yet, or (_NotOurs) another server took the port
                # first: dnsmasq then exits "Address already in use" and the
                # check above retries on another port.
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"dnsmasq not ready after {self._start_timeout}s") from None
                time.sleep(0.05)

    def _stop_dnsmasq(self) -> None:
        """Stop the watchdog and so dnsmasq; make sure dnsmasq is really gone."""
        if self._proc is None:
            return
        try:
            dnsmasq_pid: int | None = self.dnsmasq_pid
        except (OSError, ValueError):
            dnsmasq_pid = None  # it never got as far as writing its pid file
        _stop_process(self._proc, timeout=_WATCHDOG_GRACE)
        self._proc = None
        if dnsmasq_pid is not None and self._dir is not None:
            # Belt and braces: should the watchdog itself have been killed,
            # kill the dnsmasq it started, after checking by its command line
            # (our own pid file) that the pid was not reused by another process.
            _kill_if_ours(dnsmasq_pid, str(self._dir / "dnsmasq.pid"))

    def _sync_helper(self) -> None:
        """Start, update or stop the helper server for the failure modes."""
        modes = {n: m for n, m in self._records.items() if isinstance(m, str) and m != "NXDOMAIN"}
        if not modes:
            if self._helper is not None:
                self._helper.stop()
                self._helper = None
            return
        if self._helper is None:
            self._helper = DNSServer(modes, host=self._host, ttl=self._ttl).start()
        else:
            self._helper.set_records(modes)

    def _arguments(self, records: NormalRecords) -> list[str]:
        args: list[str] = []
        for name, spec in records.items():
            bare = name.rstrip(".")
            if isinstance(spec, str):
                # --local=/#/ already answers NXDOMAIN; the other modes go to the helper.
                if spec != "NXDOMAIN" and self._helper is not None:
                    args.append(f"--server=/{bare}/{self._helper.host}#{self._helper.port}")
                continue
            for rdtype, values in spec.items():
                for value in values:
                    args.append(self._argument(bare, rdtype, value))
        return args

    @staticmethod
    def _argument(bare: str, rdtype: str, value: str) -> str:
        if rdtype in ("A", "AAAA"):
            return f"--host-record={bare},{value}"
        if rdtype == "MX":
            preference, exchange = value.split()
            # dnsmasq writes the root as "." itself, which is how a null MX
            # (RFC 7505, "MX 0 .") is expressed.
            target = exchange.rstrip(".") or "."
            return f"--mx-host={bare},{target},{preference}"
        if rdtype == "CNAME":
            return f"--cname={bare},{value.rstrip('.')}"
        if rdtype == "TXT":
            # On the command line dnsmasq takes each string as one
            # comma-separated field, verbatim (quotes would be kept as text).
            rdata = dns.rdata.from_text("IN", "TXT", value)
            strings = [s.decode() for s in rdata.strings]  # type: ignore[attr-defined]
            if any("," in s for s in strings):
                raise ValueError(f"dnsmasq cannot serve a TXT string with a comma ({bare})")
            return f"--txt-record={bare}," + ",".join(strings)
        raise ValueError(f"dnsmasq cannot serve {rdtype} records ({bare})")

    def stop(self) -> None:
        self._stop_dnsmasq()
        if self._helper is not None:
            self._helper.stop()
            self._helper = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where it listens ------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None or self._dir is None:
            raise RuntimeError("dnsmasq not started")
        return self._port

    @property
    def address(self) -> str:
        return _format_address(self.host, self.port)

    @property
    def pid(self) -> int:
        """The watchdog's pid: terminating it stops dnsmasq (see dnsmasq_pid)."""
        if self._proc is None:
            raise RuntimeError("dnsmasq not started")
        return self._proc.pid

    @property
    def dnsmasq_pid(self) -> int:
        """dnsmasq's own pid, from its pid file."""
        if self._dir is None:
            raise RuntimeError("dnsmasq not started")
        return int((self._dir / "dnsmasq.pid").read_text().strip())

    # -- what it answers and was asked -----------------------------------

    @property
    def records(self) -> NormalRecords:
        copy: NormalRecords = json.loads(json.dumps(self._records))
        return copy

    def set_records(self, records: Records) -> None:
        """Serve ``records``: dnsmasq is restarted on the same port."""
        new = normalize_records(records)
        self._arguments(new)  # validate before stopping anything
        self._records = new
        if self._proc is None:
            return
        self._stop_dnsmasq()
        self._sync_helper()
        self._start_dnsmasq()

    def queries(self) -> list[tuple[str, str]]:
        """(name, type) of every query dnsmasq logged, in order."""
        out: list[tuple[str, str]] = []
        for line in self._log_lines():
            match = _DNSMASQ_QUERY.search(line)
            if match and match["name"].lower() + "." != PROBE_NAME:
                out.append((match["name"].lower(), match["type"]))
        return out

    def clear_queries(self) -> None:
        if self._dir is not None:
            with contextlib.suppress(FileNotFoundError):
                # dnsmasq opened the log with O_APPEND, so truncating is safe.
                os.truncate(self._dir / "dnsmasq.log", 0)

    def _log_lines(self) -> Iterator[str]:
        if self._dir is None:
            return iter(())
        try:
            return iter((self._dir / "dnsmasq.log").read_text(errors="replace").splitlines())
        except FileNotFoundError:
            return iter(())


def _kill_if_ours(pid: int, marker: str) -> None:
    """SIGKILL ``pid`` if it is alive and ``marker`` is in its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return  # gone
    if marker.encode() not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    # Not our child (its parent was the watchdog), so it cannot be reaped
    # here; wait until it is dead (a zombie or gone) so its port is free.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)


class _PortTaken(Exception):
    """dnsmasq could not bind its port; another one will be tried."""


class _NotOurs(Exception):
    """The readiness probe was answered by a server other than ours."""


if __name__ == "__main__":
    main()
