"""Sender authentication of mail from the Internet: SPF, DKIM, ARC, and the verdict.

Pure functions over plain data: the message bytes, the client's address, its
HELO name, the envelope sender and a `Resolver` (mta/authdns.py).  `evaluate`
runs the four checks (RFC 7208 with pyspf, RFC 6376 and RFC 8617 with dkimpy,
RFC 7489 in mta/dmarc.py) and returns a `Verdict`; `decide` turns it into
an SMTP reply or headers following the configured policy; both are tested
with a dictionary for DNS.

A DNS failure is never a pass: it is `temperror`, and `decide` answers 451 for
it unless DMARC already passes without the missing answer.
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass, field
from typing import Any

import dkim
import dkim.util
import spf

from common import headers
from common.reply import Reply
from mta.authdns import DNSTempError, Resolver, txt
from mta.dkim import from_domain
from mta.dmarc import DMARCResult, check_dmarc

# RFC 7489 7.1 / RFC 7372: DMARC refusals and temporary failures.
DMARC_REJECT = Reply(550, "5.7.1", "Message refused: DMARC policy of the From: domain ({domain}) says reject")
AUTH_TEMPERROR = Reply(451, "4.7.1", "Temporary DNS failure while checking the sender ({what}), try again later")

# --- SPF -----------------------------------------------------------------------

# pyspf asks a module-level function; it reads the resolver of the check in
# progress from this variable (each check runs in its own thread's context).
_spf_resolver: contextvars.ContextVar[Resolver] = contextvars.ContextVar("spf_resolver")


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: Any = 20) -> list[tuple[tuple[str, str], Any]]:
    resolver = _spf_resolver.get()
    try:
        values = resolver.query(name, qtype)
    except DNSTempError as exc:
        raise spf.TempError(f"DNS {exc}") from None
    if qtype in ("TXT", "SPF"):
        return [((name, qtype), [v]) for v in values]
    return [((name, qtype), v) for v in values]


spf.DNSLookup = _spf_lookup


@dataclass(frozen=True)
class SPFResult:
    result: str  # pass, fail, softfail, neutral, none, permerror, temperror
    identity: str  # "mailfrom" or "helo"
    domain: str
    explanation: str = ""


def check_spf(client_ip: str, mail_from: str, helo: str, resolver: Resolver) -> SPFResult:
    """RFC 7208 on the MAIL FROM domain, or on the HELO name for the null sender."""
    token = _spf_resolver.set(resolver)
    try:
        q = spf.query(i=client_ip, s=mail_from, h=helo, timeout=20)
        result, _code, explanation = q.check()
    finally:
        _spf_resolver.reset(token)
    identity = "mailfrom" if mail_from else "helo"
    domain = mail_from.rsplit("@", 1)[1].lower() if mail_from and "@" in mail_from else helo.lower()
    return SPFResult(str(result), identity, domain, str(explanation))


# --- DKIM and ARC ------------------------------------------------------------------


@dataclass(frozen=True)
class DKIMResult:
    result: str  # pass, fail, neutral, temperror, permerror
    domain: str
    selector: str
    algorithm: str
    b: str  # the first characters of b=, to tell signatures apart (RFC 6008)


class _DNSFunc:
    """dkimpy's TXT lookup on our resolver; remembers whether an answer was missing."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.temp = False

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        try:
            found = txt(self.resolver, text)
        except DNSTempError as exc:
            self.temp = True
            raise dkim.DnsTimeoutError(str(exc)) from None
        return found[0] if found else None


def check_dkim(message: bytes, resolver: Resolver) -> list[DKIMResult]:
    """Each DKIM-Signature, in order, verified."""
    out: list[DKIMResult] = []
    sigs = [v for n, v in header_fields(message) if n.lower() == "dkim-signature"]
    for idx, raw in enumerate(sigs):
        value = raw.split(b":", 1)[1] if b":" in raw else raw
        try:
            tags = dkim.util.parse_tag_value(re.sub(rb"\r?\n", b"", value))
        except dkim.util.InvalidTagValueList:
            tags = {}
        d = tags.get(b"d", b"").decode("ascii", "replace").lower()
        s = tags.get(b"s", b"").decode("ascii", "replace")
        a = tags.get(b"a", b"").decode("ascii", "replace")
        b = re.sub(rb"\s", b"", tags.get(b"b", b""))[:8].decode("ascii", "replace")
        func = _DNSFunc(resolver)
        try:
            ok = dkim.DKIM(message).verify(idx=idx, dnsfunc=func)
            result = "pass" if ok else ("temperror" if func.temp else "fail")
        except dkim.DnsTimeoutError:
            result = "temperror"
        except dkim.ValidationError:  # body hash mismatch, expired, ...
            result = "fail"
        except dkim.DKIMException:  # the signature itself is malformed
            result = "temperror" if func.temp else "permerror"
        out.append(DKIMResult(result, d, s, a, b))
    return out


def check_arc(message: bytes, resolver: Resolver) -> str:
    """The ARC chain's validation (RFC 8617 5.2): pass, fail or none."""
    if not re.search(rb"(?im)^arc-seal:", _head(message)):
        return "none"
    func = _DNSFunc(resolver)
    try:
        cv, _results, _comment = dkim.arc_verify(message, dnsfunc=func)
    except dkim.DKIMException:
        return "temperror" if func.temp else "fail"
    if func.temp and cv != dkim.CV_Pass:
        return "temperror"
    return (cv or b"fail").decode()


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
        return ("Authentication-Results: " + self.hostname + ";\r\n\t" + ";\r\n\t".join(parts) + "\r\n").encode(
            "utf-8", "replace"
        )


def _value(v: str) -> str:
    # RFC 8601 values are tokens or quoted strings.
    if v and re.fullmatch(r"[A-Za-z0-9!#$%&'*+./=?^_`{|}~@-]+", v):
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(v: str) -> str:
    return re.sub(r"[()\\\r\n]", "", v)


def evaluate(
    message: bytes, *, client_ip: str, helo: str, mail_from: str, hostname: str, resolver: Resolver
) -> Verdict:
    """All four checks on one message received from the Internet."""
    spf_result = check_spf(client_ip, mail_from, helo, resolver)
    dkim_results = check_dkim(message, resolver)
    dmarc_result = check_dmarc(
        from_domain(message), spf=(spf_result.result, spf_result.domain),
        dkim=[(r.result, r.domain) for r in dkim_results], resolver=resolver,
    )
    arc_result = check_arc(message, resolver)
    return Verdict(hostname, spf_result, dkim_results, dmarc_result, arc_result, mail_from, helo, client_ip)


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


def _head(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


_FIELD = re.compile(rb"(?m)^([!-9;-~]+):.*(?:\r?\n[ \t].*)*(?:\r?\n)?")


def header_fields(message: bytes) -> list[tuple[str, bytes]]:
    """(name, raw field with its folded lines and CRLF) for each header field, in order."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _FIELD.finditer(_head(message))]


def _remove_fields(message: bytes, drop: Any) -> bytes:
    head = _head(message)
    out, pos = [], 0
    for m in _FIELD.finditer(head):
        if drop(m.group(1).decode("ascii"), m.group(0)):
            out.append(message[pos:m.start()])
            pos = m.end()
    out.append(message[pos:])
    return b"".join(out)


def strip_own_results(message: bytes, hostname: str) -> bytes:
    """Remove Authentication-Results fields that claim to come from us (RFC 8601 5)."""
    host = hostname.lower().encode()

    def ours(name: str, raw: bytes) -> bool:
        if name.lower() != "authentication-results":
            return False
        # Comments may precede the authserv-id: removed in linear time (common/headers.py);
        # nested too deep to read, it is not trusted as someone else's, and goes.
        value = headers.without_comments(raw.split(b":", 1)[1])
        if value is None:
            return True
        ident = value.split(b";", 1)[0].strip().split()
        return bool(ident) and ident[0].lower().rstrip(b".") == host

    return _remove_fields(message, ours)


def strip_header(message: bytes, name: str) -> bytes:
    """Remove every field called `name`: a header we add must not come from outside."""
    low = name.lower()
    return _remove_fields(message, lambda n, _raw: n.lower() == low)
