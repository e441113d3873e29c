"""One asynchronous, caching DNS resolver per process, for every lookup a daemon makes.

MX and address routing, SPF, DKIM and ARC keys, DMARC, DNS blocklists, PTR
and, later, TLSA: every lookup goes through the one `Resolver` interface:

    answer = await resolver.lookup("example.net", "TXT")

which gives an `Answer` (records, or "no such name" / "no such record", with
whether a validating resolver vouched for it) or raises `DNSTempError` when the
answer cannot be had now (timeout, SERVFAIL, nobody answering).  Unit tests
hand in answers from a dictionary (tests/harness/dns.py) instead.

What the daemons get (`from_settings`) is two layers:

- `Wire` asks the nameservers (`[dns] nameservers`, or the system's from
  /etc/resolv.conf, or the supervised unbound) with dnspython's asynchronous
  resolver, on the daemon's own event loop: a lost answer costs the lookup
  that waits for it, never a thread other sessions need.  dnspython rather
  than pycares/aiodns because it hands back the whole response: TTLs, the SOA
  of a negative answer (RFC 2308 caching), the AD flag (DNSSEC, for DANE) and
  any record type (TLSA); truncated UDP answers are asked again over TCP, and
  an answer whose question is not ours, or whose records are for another name,
  is not taken.
- `Cache` keeps answers for their TTL, negative answers for the SOA's minimum
  (RFC 2308 5), both capped by settings, and failures a few seconds, in a
  bounded LRU; twenty sessions asking the same name at once share one query
  (in-flight coalescing).  Counts queries, hits, timeouts and query latency
  by record type for /metrics (common/counters.py).

Knows nothing about mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from common import counters
from common.config import parse_hostport

# What the daemons count (web/metrics.py names the Prometheus series after them).
QUERIES = "dns_queries"  # labels: type, result (answer | nxdomain | nodata | timeout | failure)
CACHE_HITS = "dns_cache_hits"  # labels: type, how (cached | joined: waited for a query in flight)
QUERY_SECONDS = "dns_query_seconds"  # labels: type, le (a histogram's bucket); + _sum, _count
# Upper bounds (seconds) of the query latency histogram's buckets.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The EDNS payload size DNS flag day 2020 settled on: big answers come over UDP
# without fragments, bigger ones are truncated and asked again over TCP.
EDNS_PAYLOAD = 1232


class DNSTempError(Exception):
    """The answer could not be had now (timeout, SERVFAIL, no server); asking later may work."""

    def __init__(self, text: str, *, timeout: bool = False) -> None:
        super().__init__(text)
        self.timeout = timeout


@dataclass(frozen=True)
class Answer:
    """What DNS said about (name, rdtype).  `records` are dnspython rdata (MX: .preference and
    .exchange; A/AAAA: .address; TXT: .strings; PTR/CNAME: .target; TLSA ...); empty for "no
    such name" (`nxdomain`) and for "no such record" (NODATA)."""

    name: str
    rdtype: str
    records: tuple[Any, ...] = ()
    nxdomain: bool = False
    secure: bool = False  # the resolver validated it with DNSSEC (the AD flag of a validating resolver)
    ttl: float = 0.0  # how long it may be kept (0: not at all)

    def texts(self) -> list[bytes]:
        """TXT records, each one's strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(r.strings) for r in self.records]

    def addresses(self) -> list[str]:
        """A/AAAA records as text."""
        return [str(r.address) for r in self.records]

    def mx(self) -> list[tuple[int, str]]:
        """MX records as (preference, exchange without the final dot)."""
        return [(int(r.preference), r.exchange.to_text(omit_final_dot=True)) for r in self.records]

    def targets(self) -> list[str]:
        """PTR or CNAME records: the names they point to, without the final dot."""
        return [r.target.to_text(omit_final_dot=True) for r in self.records]


class Resolver(Protocol):
    """The one DNS interface every component is given: `Wire` under a `Cache` in the
    daemons, answers from a dictionary in unit tests (tests/harness/dns.py)."""

    async def lookup(self, name: str, rdtype: str) -> Answer: ...


def key(name: str, rdtype: str) -> tuple[str, str]:
    """Names compare without case and with or without the final dot."""
    return name.lower().rstrip(".") + ".", rdtype.upper()


# --- the wire ------------------------------------------------------------------------------


class Wire:
    """Asks the nameservers with dnspython's asynchronous resolver; no cache of its own."""

    def __init__(self, nameservers: Sequence[str] = (), timeout: float = 10.0, *, try_timeout: float = 2.0) -> None:
        if nameservers:
            self._r = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for ns in nameservers:
                host, port = parse_hostport(ns, 53)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            self._r.nameservers = servers
        else:
            self._r = dns.asyncresolver.Resolver()  # the system's, from /etc/resolv.conf
        self._r.lifetime = timeout
        self._r.timeout = min(try_timeout, timeout)  # one server's turn, before the next is asked
        self._r.use_edns(0, 0, EDNS_PAYLOAD)
        # AD asks a validating resolver to say whether it validated (RFC 6840 5.7),
        # without the DO bit's signatures in every answer.
        self._r.flags = dns.flags.RD | dns.flags.AD
        self.timeout = timeout

    async def lookup(self, name: str, rdtype: str) -> Answer:
        asked = name.rstrip(".") + "."
        try:
            qname = dns.name.from_text(asked)
        except (dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.NameTooLong, dns.name.BadEscape):
            # A name no query can carry does not exist (RFC 7208 4.3 treats it so).
            return Answer(name, rdtype, nxdomain=True)
        try:
            found = await self._r.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            response = exc.responses().get(qname)  # type: ignore[no-untyped-call]
            return Answer(name, rdtype, nxdomain=True, secure=_secure(response), ttl=_negative_ttl(response))
        except dns.resolver.LifetimeTimeout:
            raise DNSTempError(f"{name} {rdtype}: no answer within {self.timeout:g}s", timeout=True) from None
        except dns.resolver.NoNameservers as exc:
            raise DNSTempError(f"{name} {rdtype}: no server could answer ({_why(exc)})") from None
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"{name} {rdtype}: {type(exc).__name__}: {exc}") from None
        response = found.response
        if found.rrset is None:  # NODATA
            return Answer(name, rdtype, secure=_secure(response), ttl=_negative_ttl(response))
        # The TTL of the whole CNAME chain: its shortest link.
        ttl = float(found.chaining_result.minimum_ttl)
        return Answer(name, rdtype, tuple(found.rrset), secure=_secure(response), ttl=ttl)


def _secure(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308 5: a negative answer is kept for the SOA's TTL or its minimum, the
    smaller; without an SOA it is not kept at all."""
    if response is None:
        return 0.0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


def _why(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    if not errors:
        return "no nameserver"
    last = errors[-1]
    response = last[4] if len(last) > 4 else None
    if response is not None:
        return dns.rcode.to_text(response.rcode())
    return type(last[3]).__name__


# --- the cache -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheLimits:
    entries: int = 10_000  # answers kept at most (least recently used go first)
    max_ttl: float = 86_400.0  # a record's TTL is cut to this
    max_negative_ttl: float = 3_600.0  # "no such name/record" kept at most this long
    failure_ttl: float = 5.0  # a failure (timeout, SERVFAIL) is remembered this long


class Cache:
    """Answers for their TTL, in-flight queries shared, over any `Resolver`.

    Runs on one event loop (the daemon's); `now` is a monotonic clock in seconds."""

    def __init__(
        self, upstream: Resolver, limits: CacheLimits = CacheLimits(), *, now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.limits = limits
        self.now = now
        # key -> (expires, Answer or the DNSTempError to raise again)
        self._kept: OrderedDict[tuple[str, str], tuple[float, Answer | DNSTempError]] = OrderedDict()
        self._flying: dict[tuple[str, str], asyncio.Future[Answer]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    async def lookup(self, name: str, rdtype: str) -> Answer:
        k = key(name, rdtype)
        kept = self._kept.get(k)
        if kept is not None:
            expires, value = kept
            if expires > self.now():
                self._kept.move_to_end(k)
                counters.inc(CACHE_HITS, type=k[1], how="cached")
                if isinstance(value, DNSTempError):
                    raise DNSTempError(str(value), timeout=value.timeout)
                return value
            del self._kept[k]
        flying = self._flying.get(k)
        if flying is None:
            flying = asyncio.ensure_future(self._ask(k, name, rdtype))
            self._flying[k] = flying
        else:
            counters.inc(CACHE_HITS, type=k[1], how="joined")
        # Shielded: a waiter that gives up (its message's time is out) leaves the
        # query to the others waiting for it, and its answer to the cache.
        return await asyncio.shield(flying)

    async def _ask(self, k: tuple[str, str], name: str, rdtype: str) -> Answer:
        started = time.monotonic()
        try:
            answer = await self.upstream.lookup(name, rdtype)
        except DNSTempError as exc:
            _count_query(k[1], "timeout" if exc.timeout else "failure", time.monotonic() - started)
            self._keep(k, exc, self.limits.failure_ttl)
            raise
        finally:
            self._flying.pop(k, None)
        result = "answer" if answer.records else ("nxdomain" if answer.nxdomain else "nodata")
        _count_query(k[1], result, time.monotonic() - started)
        cap = self.limits.max_ttl if answer.records else self.limits.max_negative_ttl
        self._keep(k, answer, min(answer.ttl, cap))
        return answer

    def _keep(self, k: tuple[str, str], value: Answer | DNSTempError, ttl: float) -> None:
        if ttl <= 0 or self.limits.entries <= 0:
            return
        self._kept[k] = (self.now() + ttl, value)
        self._kept.move_to_end(k)
        while len(self._kept) > self.limits.entries:
            self._kept.popitem(last=False)


def _count_query(rdtype: str, result: str, seconds: float) -> None:
    counters.inc(QUERIES, type=rdtype, result=result)
    le = next((str(b) for b in BUCKETS if seconds <= b), "+Inf")
    counters.inc(QUERY_SECONDS + "_bucket", type=rdtype, le=le)
    counters.COUNTERS.inc(QUERY_SECONDS + "_sum", seconds, type=rdtype)


# --- what the daemons build ----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The values a resolver is built from (the daemon skeleton fills them from `[dns]`)."""

    nameservers: tuple[str, ...] = ()  # host:port; empty: the system's
    timeout: float = 10.0
    limits: CacheLimits = CacheLimits()


def from_settings(settings: Settings) -> Cache:
    """The process's resolver: the wire under a cache."""
    return Cache(Wire(settings.nameservers, settings.timeout), settings.limits)


async def validates(nameservers: Sequence[str] = (), *, name: str = ".", timeout: float = 5.0) -> bool | None:
    """Does the resolver at `nameservers` (empty: the system's) validate DNSSEC?

    Asks for the SOA of `name` (default the root, which is signed) with the AD
    bit: a validating resolver sets AD in its answer, one that does not validate
    leaves it clear.  None when no answer came at all (nothing to tell by)."""
    try:
        answer = await Wire(nameservers, timeout).lookup(name, "SOA")
    except DNSTempError:
        return None
    return answer.secure


def validates_now(nameservers: Sequence[str] = (), *, name: str = ".", timeout: float = 5.0) -> bool | None:
    """`validates` for a command outside any event loop (`mailroom dns --check`)."""
    with contextlib.closing(asyncio.new_event_loop()) as loop:
        return loop.run_until_complete(validates(nameservers, name=name, timeout=timeout))
