"""SPF (RFC 7208): may this client address send mail for this domain?

`check_host` is the RFC's function of the same name, evaluated over the
process's asynchronous resolver (common/dns.py), so a check waiting for DNS
holds no thread and no other session: pyspf asks DNS itself, blocking.  Pure
otherwise: records in, a result out.  The OpenSPF test suite for RFC 7208
(tests/unit/data/rfc7208-tests.yml) runs against it.

The limits of RFC 7208 4.6.4, which keep one message from costing the
receiver (or a victim's DNS) more than a few queries:

- at most 10 terms that query DNS (include, a, mx, ptr, exists, redirect):
  one more is a permerror, and so is an include or redirect loop, which
  always reaches it;
- at most 2 "void" lookups (no such name, or no such record) in those terms;
- an mx term may return at most 10 MX records (permerror), a ptr term looks
  at the first 10 names only.

A lookup that fails (timeout, SERVFAIL) is a temperror; the caller bounds the
whole check's time (`[dns] timeout`).  Not done: the obsolete SPF record type
(RFC 7208 3.1 retired it).
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass

from common.dns import Answer, DNSTempError, Resolver

MAX_LOOKUPS = 10  # RFC 7208 4.6.4: terms causing DNS queries
MAX_VOID = 2  # ... lookups answering no such name or no record
MAX_MX = 10  # MX records an mx term may return
MAX_PTR = 10  # PTR names a ptr term (or %{p}) looks at

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
_QUALIFIER = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_MODIFIER = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)=(.*)$", re.S)
_VERSION = re.compile(rb"^v=spf1(?: |$)", re.I)
_CIDR = re.compile(r"^(.*?)(?:/(0|[1-9][0-9]{0,2}))?(?://(0|[1-9][0-9]{0,2}))?$", re.S)
_MACRO_LETTERS = "slodiphcrtv"
_EXP_ONLY = "crt"
# RFC 7208 7.1: toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )
_TOPLABEL = re.compile(r"\.(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])\.?$")


@dataclass(frozen=True)
class SPFResult:
    result: str  # pass, fail, softfail, neutral, none, permerror, temperror
    identity: str  # "mailfrom" or "helo"
    domain: str
    explanation: str = ""


class PermError(Exception):
    """The record is broken (syntax, limits): the result is permerror."""


class TempError(Exception):
    """DNS did not answer: the result is temperror."""


async def check(
    resolver: Resolver, *, client_ip: str, mail_from: str, helo: str, receiver: str = "unknown",
    default_explanation: str = "",
) -> SPFResult:
    """RFC 7208 on the MAIL FROM identity, or on the HELO identity for the null sender (2.4)."""
    if mail_from:
        identity = "mailfrom"
        local, _, domain = mail_from.rpartition("@")
        local = local or "postmaster"  # RFC 7208 4.3
    else:
        identity, local, domain = "helo", "postmaster", helo
    sender = f"{local}@{domain}"
    ev = Evaluation(resolver, client_ip, sender, helo, receiver)
    result, explanation = await ev.check_host(domain)
    if result == "fail" and not explanation:
        explanation = default_explanation
    return SPFResult(result, identity, domain.lower(), explanation)


class Evaluation:
    """One check_host() with its nested includes and redirects, sharing the limits."""

    def __init__(self, resolver: Resolver, ip: str, sender: str, helo: str, receiver: str = "unknown") -> None:
        self.resolver = resolver
        addr = ipaddress.ip_address(ip)
        # RFC 7208 5: an IPv4-mapped IPv6 address is the IPv4 client it carries.
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        self.ip: ipaddress.IPv4Address | ipaddress.IPv6Address = addr
        self.sender = sender
        self.helo = helo
        self.receiver = receiver
        self.lookups = 0
        self.voids = 0
        self._validated: str | None = None  # %{p}, worked out once

    async def check_host(self, domain: str) -> tuple[str, str]:
        """(result, explanation) for `domain`."""
        try:
            return await self._check_host(domain, top=True)
        except PermError:
            return "permerror", ""
        except TempError:
            return "temperror", ""

    async def _check_host(self, domain: str, *, top: bool = False) -> tuple[str, str]:
        if not _valid_domain(domain):
            return "none", ""  # RFC 7208 4.3: malformed, or no dot at all
        record = await self._record(domain)
        if record is None:
            return "none", ""
        terms = _parse(record)
        if _uses_p(terms):
            await self.prepare_p()
        redirect = next((v for k, v in terms.modifiers if k == "redirect"), None)
        for qualifier, name, arg, cidr4, cidr6 in terms.mechanisms:
            if await self._matches(domain, name, arg, cidr4, cidr6):
                result = _QUALIFIER[qualifier]
                explanation = ""
                if result == "fail":
                    explanation = await self._explain(domain, terms)
                return result, explanation
        if redirect is not None and not terms.has_all:
            self._count()
            target = self._expand(redirect, domain)
            if not _valid_domain(target):
                raise PermError(f"redirect={target}: not a domain")
            result, explanation = await self._check_host(target)
            if result == "none":
                raise PermError(f"redirect={target}: no SPF record")
            return result, explanation
        return "neutral", ""

    # --- the record ----------------------------------------------------------------

    async def _record(self, domain: str) -> str | None:
        answer = await self._lookup(domain, "TXT")
        if answer is None:
            return None
        found = [t for t in answer.texts() if _VERSION.match(t)]
        if not found:
            return None
        if len(found) > 1:
            raise PermError(f"{domain}: more than one SPF record")
        try:
            return found[0].decode("ascii")
        except UnicodeDecodeError:
            raise PermError(f"{domain}: SPF record is not ASCII") from None

    async def _lookup(self, name: str, rdtype: str, *, void: bool = False) -> Answer | None:
        """The Answer, or None for no such name; `void` counts an empty answer as a void lookup."""
        try:
            answer = await self.resolver.lookup(name, rdtype)
        except DNSTempError as exc:
            raise TempError(str(exc)) from None
        if void and not answer.records:
            self.voids += 1
            if self.voids > MAX_VOID:
                raise PermError(f"more than {MAX_VOID} void lookups")
        if answer.nxdomain:
            return None
        return answer

    def _count(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise PermError(f"more than {MAX_LOOKUPS} DNS lookups")

    # --- mechanisms -------------------------------------------------------------------

    async def _matches(self, domain: str, name: str, arg: str | None, cidr4: int | None, cidr6: int | None) -> bool:
        ip = self.ip
        if name == "all":
            return True
        if name == "ip4":
            assert arg is not None
            return ip.version == 4 and ip in _network(arg, cidr4, 4)
        if name == "ip6":
            assert arg is not None
            return ip.version == 6 and ip in _network(arg, cidr6, 6)
        self._count()
        target = self._expand(arg, domain) if arg is not None else domain
        if name == "include":
            if not _valid_domain(target):
                raise PermError(f"include:{target}: not a domain")
            result, _ = await self._check_host(target)
            if result in ("none", "permerror"):
                raise PermError(f"include:{target}: {result}")
            if result == "temperror":
                raise TempError(f"include:{target}")
            return result == "pass"
        if not _valid_domain(target):
            return False  # a name no query can carry (RFC 7208 4.8: no match)
        if name == "exists":
            answer = await self._lookup(target, "A", void=True)
            return answer is not None and bool(answer.records)
        if name == "a":
            return await self._address_matches(target, cidr4, cidr6, void=True)
        if name == "mx":
            answer = await self._lookup(target, "MX", void=True)
            if answer is None:
                return False
            exchanges = answer.mx()
            if len(exchanges) > MAX_MX:
                raise PermError(f"mx:{target}: more than {MAX_MX} MX records")
            for _pref, exchange in exchanges:
                if await self._address_matches(exchange, cidr4, cidr6):
                    return True
            return False
        if name == "ptr":
            wanted = target.lower().rstrip(".")
            names = await self._validated_names(target)
            return any(n == wanted or n.endswith("." + wanted) for n in names)
        raise AssertionError(name)

    async def _address_matches(self, host: str, cidr4: int | None, cidr6: int | None, *, void: bool = False) -> bool:
        rdtype = "A" if self.ip.version == 4 else "AAAA"
        answer = await self._lookup(host, rdtype, void=void)
        if answer is None:
            return False
        bits = (cidr4 if cidr4 is not None else 32) if self.ip.version == 4 else (cidr6 if cidr6 is not None else 128)
        for address in answer.addresses():
            net = ipaddress.ip_network(f"{address}/{bits}", strict=False)
            if self.ip in net:
                return True
        return False

    async def _validated_names(self, target: str | None = None) -> list[str]:
        """RFC 7208 5.5: names of the client's PTR records whose addresses include it."""
        try:
            answer = await self.resolver.lookup(self.ip.reverse_pointer, "PTR")
        except DNSTempError:
            return []  # "If a DNS error occurs while doing the PTR RR lookup, then this mechanism fails to match."
        names = [n.lower().rstrip(".") for n in answer.targets()][:MAX_PTR]
        if target is not None:
            # The names ending in the target first: they are the ones that can match.
            wanted = target.lower().rstrip(".")
            names.sort(key=lambda n: not (n == wanted or n.endswith("." + wanted)))
        valid = []
        for name in names:
            try:
                if await self._address_matches(name, None, None):
                    valid.append(name)
            except TempError:
                continue
        return valid

    # --- explanations (RFC 7208 6.2) ---------------------------------------------------

    async def _explain(self, domain: str, terms: _Terms) -> str:
        exp = next((v for k, v in terms.modifiers if k == "exp"), None)
        if exp is None:
            return ""
        try:
            target = self._expand(exp, domain)
            if not _valid_domain(target):
                return ""
            answer = await self.resolver.lookup(target, "TXT")
            texts = answer.texts()
            if len(texts) != 1:
                return ""
            text = texts[0].decode("ascii")
            if "%{p" in text.lower():
                await self.prepare_p()
            return self._expand(text, domain, explanation=True)
        except (DNSTempError, PermError, UnicodeDecodeError):
            return ""

    # --- macros (RFC 7208 7) -------------------------------------------------------------

    def _expand(self, spec: str, domain: str, *, explanation: bool = False) -> str:
        out: list[str] = []
        i = 0
        while i < len(spec):
            ch = spec[i]
            if ch != "%":
                out.append(ch)
                i += 1
                continue
            nxt = spec[i + 1: i + 2]
            if nxt == "%":
                out.append("%")
                i += 2
            elif nxt == "_":
                out.append(" ")
                i += 2
            elif nxt == "-":
                out.append("%20")
                i += 2
            elif nxt == "{":
                end = spec.find("}", i)
                if end < 0:
                    raise PermError(f"unclosed macro in {spec!r}")
                out.append(self._macro(spec[i + 2: end], domain, explanation))
                i = end + 1
            else:
                raise PermError(f"bad macro in {spec!r}")
        text = "".join(out)
        if not explanation:
            # RFC 7208 7.3: a longer result loses labels on the left until it fits.
            while len(text) > 253 and "." in text:
                text = text.split(".", 1)[1]
        return text

    def _macro(self, body: str, domain: str, explanation: bool) -> str:
        m = re.fullmatch(r"([A-Za-z])([0-9]*)(r?)([.\-+,/_=]*)", body, re.I)
        if not m:
            raise PermError(f"bad macro %{{{body}}}")
        letter, digits, reverse, delimiters = m.groups()
        low = letter.lower()
        if low not in _MACRO_LETTERS or (low in _EXP_ONLY and not explanation):
            raise PermError(f"macro %{{{letter}}} not allowed here")
        value = self._macro_value(low, domain)
        parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
        if reverse:
            parts.reverse()
        if digits:
            n = int(digits)
            if n == 0:
                raise PermError("macro digit transformer of 0")
            parts = parts[-n:]
        text = ".".join(parts)
        if letter.isupper():
            text = urllib.parse.quote(text, safe="-._~")
        return text

    def _macro_value(self, letter: str, domain: str) -> str:
        ip = self.ip
        match letter:
            case "s":
                return self.sender
            case "l":
                return self.sender.rpartition("@")[0]
            case "o":
                return self.sender.rpartition("@")[2]
            case "d":
                return domain
            case "i":
                if ip.version == 4:
                    return str(ip)
                return ".".join(ip.exploded.replace(":", ""))
            case "p":
                return self._validated or "unknown"
            case "v":
                return "in-addr" if ip.version == 4 else "ip6"
            case "h":
                return self.helo
            case "c":
                return str(ip)
            case "r":
                return self.receiver or "unknown"
            case "t":
                return str(int(time.time()))
        raise AssertionError(letter)

    async def prepare_p(self) -> None:
        """Work out %{p} (the validated client name) before a record that uses it is evaluated."""
        if self._validated is None:
            names = await self._validated_names()
            self._validated = names[0] if names else "unknown"


# --- the record's syntax ---------------------------------------------------------------------


@dataclass
class _Terms:
    mechanisms: list[tuple[str, str, str | None, int | None, int | None]]
    modifiers: list[tuple[str, str]]
    has_all: bool


def _parse(record: str) -> _Terms:
    """Every term checked before any is evaluated (RFC 7208 4.6: a syntax error anywhere is a permerror)."""
    mechanisms: list[tuple[str, str, str | None, int | None, int | None]] = []
    modifiers: list[tuple[str, str]] = []
    for term in record.split(" ")[1:]:
        if not term:
            continue  # several spaces separate terms as one does
        m = _MODIFIER.match(term)
        if m:
            name, value = m.group(1).lower(), m.group(2)
            if name in ("redirect", "exp"):
                if any(k == name for k, _ in modifiers):
                    raise PermError(f"{name}= twice")
                _check_domain_spec(value)
            else:
                _check_macro_string(value)
            modifiers.append((name, value))
            continue
        mechanisms.append(_mechanism(term))
    return _Terms(mechanisms, modifiers, any(name == "all" for _, name, *_ in mechanisms))


def _mechanism(term: str) -> tuple[str, str, str | None, int | None, int | None]:
    qualifier = "+"
    if term[0] in _QUALIFIER:
        qualifier, term = term[0], term[1:]
    m = re.match(r"[A-Za-z0-9]*", term)
    name = m.group(0).lower() if m else ""
    rest = term[len(name):]
    if name not in _MECHANISMS or (rest and rest[0] not in ":/"):
        raise PermError(f"unknown mechanism {term!r}")
    arg: str | None = None
    cidr4 = cidr6 = None
    if name in ("a", "mx"):
        c = _CIDR.match(rest)
        assert c is not None
        body, c4, c6 = c.groups()
        cidr4, cidr6 = _bits(c4, 32), _bits(c6, 128)
        if body:
            if not body.startswith(":") or not body[1:]:
                raise PermError(f"bad term {term!r}")
            arg = body[1:]
            _check_domain_spec(arg)
    elif name in ("include", "exists", "ptr"):
        if rest:
            if not rest.startswith(":") or not rest[1:]:
                raise PermError(f"bad term {term!r}")
            arg = rest[1:]
            _check_domain_spec(arg)
        elif name != "ptr":
            raise PermError(f"{name} needs a domain")
    elif name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise PermError(f"{name} needs an address")
        address, _, bits = rest[1:].partition("/")
        version = 4 if name == "ip4" else 6
        limit = 32 if version == 4 else 128
        n = _bits(bits, limit) if _ else None
        if _ and n is None:
            raise PermError(f"bad prefix length in {term!r}")
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            raise PermError(f"bad address in {term!r}") from None
        if parsed.version != version or (version == 4 and not re.fullmatch(r"[0-9.]+", address)):
            raise PermError(f"bad address in {term!r}")
        arg = address
        if version == 4:
            cidr4 = n
        else:
            cidr6 = n
    elif rest:  # all takes nothing
        raise PermError(f"bad term {term!r}")
    return qualifier, name, arg, cidr4, cidr6


def _bits(text: str | None, limit: int) -> int | None:
    if text is None:
        return None
    if not re.fullmatch(r"0|[1-9][0-9]*", text) or int(text) > limit:
        raise PermError(f"bad prefix length /{text}")
    return int(text)


def _network(address: str, bits: int | None, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    n = bits if bits is not None else (32 if version == 4 else 128)
    return ipaddress.ip_network(f"{address}/{n}", strict=False)


def _check_macro_string(spec: str) -> None:
    i = 0
    while i < len(spec):
        ch = spec[i]
        if not 0x21 <= ord(ch) <= 0x7E:
            raise PermError(f"bad character in {spec!r}")
        if ch == "%":
            nxt = spec[i + 1: i + 2]
            if nxt in ("%", "_", "-"):
                i += 2
                continue
            if nxt != "{":
                raise PermError(f"bad macro in {spec!r}")
            end = spec.find("}", i)
            if end < 0 or not re.fullmatch(r"[A-Za-z][0-9]*r?[.\-+,/_=]*", spec[i + 2: end], re.I):
                raise PermError(f"bad macro in {spec!r}")
            if spec[i + 2].lower() not in _MACRO_LETTERS or spec[i + 2].lower() in _EXP_ONLY:
                raise PermError(f"macro %{{{spec[i + 2]}}} not allowed here")
            i = end + 1
            continue
        i += 1


def _check_domain_spec(spec: str) -> None:
    """RFC 7208 7.1: domain-spec = macro-string domain-end."""
    _check_macro_string(spec)
    if not spec:
        raise PermError("empty domain")
    if spec.endswith("}") and re.search(r"%\{[^}]*\}$", spec):
        return
    if not _TOPLABEL.search(spec):
        raise PermError(f"{spec!r} does not end in a top-level label")


def _valid_domain(name: str) -> bool:
    """A multi-label name a query can carry (RFC 7208 4.3)."""
    name = name.rstrip(".")
    if not name or len(name) > 253 or "." not in name:
        return False
    return all(0 < len(label) <= 63 for label in name.split("."))


def _uses_p(terms: _Terms) -> bool:
    """Does the record use the %{p} macro (the validated client name, which costs lookups)?"""
    return any("%{p" in (arg or "").lower() for _, _, arg, _, _ in terms.mechanisms) or any(
        "%{p" in v.lower() for _, v in terms.modifiers
    )
