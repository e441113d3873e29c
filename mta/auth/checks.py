"""Sender authentication of mail from the Internet: SPF, DKIM, ARC, and the verdict.

Functions over plain data: the message bytes, the client's address, its HELO
name, the envelope sender and the process's asynchronous resolver
(common/dns.py).  `evaluate` runs the four checks (RFC 7208 in mta/auth/spf.py,
RFC 6376 and RFC 8617 with dkimpy, RFC 7489 in mta/auth/dmarc.py) and returns a
`Verdict`; `decide` turns it into an SMTP reply or headers following the
configured policy; both are tested with a dictionary for DNS.

No check holds a thread while it waits for DNS: SPF asks the resolver as it
goes; for DKIM and ARC the keys the signatures name are fetched first, all at
once, and dkimpy then verifies (CPU only, in a worker thread) with those
answers.  Each check has `timeout` seconds for its lookups; one that runs
out is `temperror` for this message alone.

A DNS failure is never a pass: it is `temperror`, and `decide` answers 451 for
it unless DMARC already passes without the missing answer.

At most `MAX_SIGNATURES` DKIM signatures are verified per message (RFC 6376
6.1 lets a verifier limit them): each costs a key lookup, and a message of a
thousand signatures must not cost a thousand queries.  Those of the From:
domain (or its parent) come first, then the others in order.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import dkim
import dkim.util

from common import headers
from common.dns import DNSTempError, Resolver
from common.message import Field, fields, fold, remove, unfold
from common.reply import Reply
from mta.auth import dmarc, spf
from mta.auth.dkim import from_domain
from mta.auth.dmarc import DMARCResult
from mta.auth.spf import SPFResult

log = logging.getLogger("checks")

# RFC 7489 7.1 / RFC 7372: DMARC refusals and temporary failures.
DMARC_REJECT = Reply(550, "5.7.1", "Message refused: DMARC policy of the From: domain ({domain}) says reject")
AUTH_TEMPERROR = Reply(451, "4.7.1", "Temporary DNS failure while checking the sender ({what}), try again later")

MAX_SIGNATURES = 5  # DKIM signatures verified per message (RFC 6376 6.1)
MAX_ARC_KEYS = 10  # distinct keys an ARC chain may need (each one a lookup)
DEFAULT_TIMEOUT = 10.0  # seconds for one check's lookups ([dns] timeout)

T = TypeVar("T")

__all__ = ["SPFResult", "DKIMResult", "Verdict", "evaluate", "decide", "check_spf", "check_dkim", "check_arc"]


async def _bounded(seconds: float, work: Awaitable[T], on_timeout: Callable[[], T]) -> T:
    """`work`, or what `on_timeout` says when its lookups take longer than `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        return on_timeout()


# --- SPF -----------------------------------------------------------------------


async def check_spf(client_ip: str, mail_from: str, helo: str, resolver: Resolver) -> SPFResult:
    """RFC 7208 on the MAIL FROM domain, or on the HELO name for the null sender."""
    return await spf.check(resolver, client_ip=client_ip, mail_from=mail_from, helo=helo)


# --- DKIM and ARC ------------------------------------------------------------------


@dataclass(frozen=True)
class DKIMResult:
    result: str  # pass, fail, neutral, temperror, permerror
    domain: str
    selector: str
    algorithm: str
    b: str  # the first characters of b=, to tell signatures apart (RFC 6008)


@dataclass(frozen=True)
class _Signature:
    index: int  # among the message's DKIM-Signature fields, for dkimpy's verify(idx=)
    domain: str
    selector: str
    algorithm: str
    b: str

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def _tags(f: Field) -> dict[bytes, bytes]:
    try:
        return dict(dkim.util.parse_tag_value(unfold(f.value)))
    except dkim.util.InvalidTagValueList:
        return {}


def _text(tags: dict[bytes, bytes], tag: bytes) -> str:
    return tags.get(tag, b"").decode("ascii", "replace").strip()


def signatures(message: bytes) -> list[_Signature]:
    """Every DKIM-Signature of the message, in order, with the tags that name its key."""
    out = []
    for idx, f in enumerate(f for f in fields(message) if f.name.lower() == "dkim-signature"):
        tags = _tags(f)
        b = re.sub(rb"\s", b"", tags.get(b"b", b""))[:8].decode("ascii", "replace")
        out.append(_Signature(idx, _text(tags, b"d").lower(), _text(tags, b"s"), _text(tags, b"a"), b))
    return out


def choose(sigs: list[_Signature], author_domain: str | None, limit: int = MAX_SIGNATURES) -> list[_Signature]:
    """The signatures to verify: the From: domain's (or its parent's) first, then the rest, `limit` in all."""
    def author(s: _Signature) -> bool:
        return author_domain is not None and bool(s.domain) and (
            author_domain == s.domain or author_domain.endswith("." + s.domain)
        )

    ordered = [s for s in sigs if author(s)] + [s for s in sigs if not author(s)]
    return sorted(ordered[:limit], key=lambda s: s.index)


_MISSING = object()


async def _fetch_keys(names: list[str], resolver: Resolver) -> dict[str, bytes | None | DNSTempError]:
    """Each key record's TXT (the first; None when there is none), or the failure, asked all at once."""
    async def one(name: str) -> bytes | None | DNSTempError:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or ".." in name or name.startswith("."):
            return None  # no query can be made of it: there is no such key
        try:
            texts = (await resolver.lookup(name, "TXT")).texts()
        except DNSTempError as exc:
            return exc
        return texts[0] if texts else None

    unique = list(dict.fromkeys(n.lower() for n in names))
    found = await asyncio.gather(*(one(n) for n in unique))
    return dict(zip(unique, found, strict=True))


class _Keys:
    """dkimpy's TXT lookup, answered from keys fetched beforehand; never the network."""

    def __init__(self, keys: dict[str, bytes | None | DNSTempError]) -> None:
        self.keys = keys
        self.temp = False

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        text = (name.decode() if isinstance(name, bytes) else name).lower().rstrip(".")
        found = self.keys.get(text, _MISSING)
        if found is _MISSING or isinstance(found, DNSTempError):
            self.temp = True
            raise dkim.DnsTimeoutError(f"{text}: {found if found is not _MISSING else 'not fetched'}")
        assert found is None or isinstance(found, bytes)
        return found


def _verify_one(message: bytes, sig: _Signature, keys: dict[str, bytes | None | DNSTempError]) -> str:
    func = _Keys(keys)
    try:
        ok = dkim.DKIM(message).verify(idx=sig.index, dnsfunc=func)
        return "pass" if ok else ("temperror" if func.temp else "fail")
    except dkim.DnsTimeoutError:
        return "temperror"
    except dkim.ValidationError:  # body hash mismatch, expired, ...
        return "fail"
    except dkim.DKIMException:  # the signature itself is malformed
        return "temperror" if func.temp else "permerror"


async def check_dkim(
    message: bytes, resolver: Resolver, *, author_domain: str | None = None, limit: int = MAX_SIGNATURES,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[DKIMResult]:
    """The chosen DKIM signatures (at most `limit`, see `choose`), in order, verified."""
    sigs = signatures(message)
    if not sigs:
        return []
    chosen = choose(sigs, author_domain, limit)
    if len(sigs) > len(chosen):
        log.info("%d DKIM signatures: verifying %d (at most %d per message)", len(sigs), len(chosen), limit)
    timed_out: dict[str, bytes | None | DNSTempError] = {
        s.key_name.lower(): DNSTempError("key lookups timed out", timeout=True) for s in chosen
    }
    keys = await _bounded(timeout, _fetch_keys([s.key_name for s in chosen], resolver), lambda: timed_out)

    def verify_all() -> list[DKIMResult]:
        return [DKIMResult(_verify_one(message, s, keys), s.domain, s.selector, s.algorithm, s.b) for s in chosen]

    # Canonicalization and RSA are CPU work: not on the event loop, which other sessions need.
    return await asyncio.to_thread(verify_all)


def _arc_key_names(message: bytes) -> list[str]:
    names = []
    for f in fields(message):
        if f.name.lower() in ("arc-seal", "arc-message-signature"):
            tags = _tags(f)
            names.append(f"{_text(tags, b's')}._domainkey.{_text(tags, b'd').lower()}")
    return list(dict.fromkeys(names))


async def check_arc(message: bytes, resolver: Resolver, *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The ARC chain's validation (RFC 8617 5.2): pass, fail, none or temperror."""
    if not any(f.name.lower() == "arc-seal" for f in fields(message)):
        return "none"
    names = _arc_key_names(message)
    if len(names) > MAX_ARC_KEYS:
        log.info("ARC chain needs %d keys: not verified (at most %d)", len(names), MAX_ARC_KEYS)
        return "fail"
    keys = await _bounded(timeout, _fetch_keys(names, resolver), lambda: {})
    if not keys:
        return "temperror"

    def verify() -> str:
        func = _Keys(keys)
        try:
            cv, _results, _comment = dkim.arc_verify(message, dnsfunc=func)
        except dkim.DKIMException:
            return "temperror" if func.temp else "fail"
        if func.temp and cv != dkim.CV_Pass:
            return "temperror"
        return (cv or b"fail").decode()

    return await asyncio.to_thread(verify)


# --- together -----------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    hostname: str
    spf: SPFResult
    dkim: list[DKIMResult]
    dmarc: DMARCResult
    arc: str
    mail_from: str = ""
    helo: str = ""
    client_ip: str = ""

    def temperrors(self) -> list[str]:
        out = []
        if self.spf.result == "temperror":
            out.append("spf")
        if any(r.result == "temperror" for r in self.dkim):
            out.append("dkim")
        if self.dmarc.result == "temperror":
            out.append("dmarc")
        return out

    def summary(self) -> str:
        dk = ",".join(f"{r.result}:{r.domain}" for r in self.dkim) or "none"
        return f"spf={self.spf.result} dkim={dk} dmarc={self.dmarc.result}(p={self.dmarc.policy}) arc={self.arc}"

    def header(self) -> bytes:
        """The Authentication-Results field (RFC 8601), folded, ending in CRLF."""
        parts: list[str] = []
        s = self.spf
        if s.identity == "mailfrom":
            prop = f"smtp.mailfrom={_value(self.mail_from)}"
        else:
            prop = f"smtp.helo={_value(self.helo)}"
        parts.append(f"spf={s.result} ({_comment(f'{self.client_ip} for {s.domain}')}) {prop}")
        if not self.dkim:
            parts.append("dkim=none")
        for r in self.dkim:
            parts.append(
                f"dkim={r.result} header.d={_value(r.domain)} header.s={_value(r.selector)}"
                f" header.a={_value(r.algorithm)} header.b={_value(r.b)}"
            )
        d = self.dmarc
        if d.domain:
            parts.append(f"dmarc={d.result} (p={d.policy}) header.from={_value(d.domain)}")
        else:
            parts.append("dmarc=permerror (no single From: address)")
        parts.append(f"arc={self.arc}")
        lines = [self.hostname, *parts]
        return fold("Authentication-Results", [line + ";" for line in lines[:-1]] + lines[-1:]).encode(
            "utf-8", "replace"
        )


def _value(v: str) -> str:
    # RFC 8601 values are tokens or quoted strings.
    if v and re.fullmatch(r"[A-Za-z0-9!#$%&'*+./=?^_`{|}~@-]+", v):
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(v: str) -> str:
    return re.sub(r"[()\\\r\n]", "", v)


async def evaluate(
    message: bytes, *, client_ip: str, helo: str, mail_from: str, hostname: str, resolver: Resolver,
    timeout: float = DEFAULT_TIMEOUT,
) -> Verdict:
    """All four checks on one message received from the Internet, their lookups at once;
    each check has `timeout` seconds for its lookups, after which it is a temperror."""
    author = from_domain(message)

    async def dmarc_record() -> dmarc.Record | None:
        if author is None:
            return None
        try:
            return await dmarc.dmarc_record(author, resolver)
        except DNSTempError:
            return None

    # A check with nothing to check (no DKIM-Signature, no ARC-Seal: most mail has no
    # ARC) has its answer now, and gets no task of its own (gather takes a done future as is).
    present = {f.name.lower() for f in fields(message)}
    loop = asyncio.get_running_loop()
    spf_result, dkim_results, record, arc_result = await asyncio.gather(
        _bounded(timeout, check_spf(client_ip, mail_from, helo, resolver), lambda: _spf_timeout(mail_from, helo)),
        check_dkim(message, resolver, author_domain=author, timeout=timeout)
        if "dkim-signature" in present else _done(loop, []),
        _bounded(timeout, dmarc_record(), lambda: None),
        check_arc(message, resolver, timeout=timeout) if "arc-seal" in present else _done(loop, "none"),
    )
    dmarc_result = dmarc.verdict(
        author, record, spf=(spf_result.result, spf_result.domain),
        dkim=[(r.result, r.domain) for r in dkim_results],
    )
    return Verdict(hostname, spf_result, dkim_results, dmarc_result, arc_result, mail_from, helo, client_ip)


def _done(loop: asyncio.AbstractEventLoop, value: T) -> asyncio.Future[T]:
    future: asyncio.Future[T] = loop.create_future()
    future.set_result(value)
    return future


def _spf_timeout(mail_from: str, helo: str) -> SPFResult:
    if mail_from:
        return SPFResult("temperror", "mailfrom", mail_from.rpartition("@")[2].lower(), "DNS lookups timed out")
    return SPFResult("temperror", "helo", helo.lower(), "DNS lookups timed out")


@dataclass(frozen=True)
class Decision:
    reply: Reply | None
    headers: bytes = b""
    notes: list[str] = field(default_factory=list)


def decide(verdict: Verdict, *, dmarc_reject: bool, defer_on_dns_error: bool, quarantine_header: str) -> Decision:
    """What to do with a verdict: refuse, defer, or deliver with these headers.

    An SPF failure alone is only recorded: DMARC decides whether it matters.
    """
    d = verdict.dmarc
    if d.result == "fail" and d.policy == "reject" and dmarc_reject:
        return Decision(DMARC_REJECT.with_text(DMARC_REJECT.text.format(domain=d.domain)))
    temp = verdict.temperrors()
    if temp and d.result != "pass" and defer_on_dns_error:
        return Decision(AUTH_TEMPERROR.with_text(AUTH_TEMPERROR.text.format(what=", ".join(temp))))
    headers = verdict.header()
    if d.result == "fail" and d.policy in ("quarantine", "reject") and quarantine_header:
        headers += f"{quarantine_header}: dmarc=fail policy={d.policy} header.from={d.domain}\r\n".encode()
    return Decision(None, headers)


# --- header surgery ------------------------------------------------------------------


def strip_own_results(message: bytes, hostname: str) -> bytes:
    """Remove Authentication-Results fields that claim to come from us (RFC 8601 5)."""
    host = hostname.lower().encode()

    def ours(f: Field) -> bool:
        if f.name.lower() != "authentication-results":
            return False
        # Comments may precede the authserv-id: removed in linear time (common/headers.py);
        # nested too deep to read, it is not trusted as someone else's, and goes.
        read = headers.authserv_id(f.value)
        return read is None or read[0] == host

    return remove(message, ours)


def strip_header(message: bytes, name: str) -> bytes:
    """Remove every field called `name`: a header we add must not come from outside."""
    low = name.lower()
    return remove(message, lambda f: f.name.lower() == low)
