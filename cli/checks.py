"""Status checks: is this host set up the way mail from and to the Internet needs it?

One check per thing that can be wrong, each a `Check` that says what was
expected, what was found and how to fix it.  The same code answers
`mailroom dns DOMAIN --check` (the DNS records of one domain),
`mailroom status-checks` (everything) and the admin page (which runs
`mailroom status-checks --json`), so the three never disagree.

- DNS records of each domain: MX, SPF, DKIM, DMARC, MTA-STS, TLS-RPT (the
  records `mailroom dns` suggests, cli/dns.py), compared with what is published;
- the host: its A/AAAA, PTR, forward-confirmed reverse DNS (FCDNS), the TLSA
  record for DANE, and whether its addresses are on the `[filter] dnsbl_zones`;
- local: the certificate's expiry, the last backup's age and outcome.

Every DNS question goes out at once (a thread each), so the whole run takes one
DNS timeout at worst, not one per record; when no question got any answer the
run says so in one line (`Report.unreachable`) instead of an error per record.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

from common import backupstatus
from common.config import Config
from mta.auth.authdns import DNSTempError, Resolver, txt

if TYPE_CHECKING:
    from cli.dns import Record

# Levels, from good to bad: `warn` is worth a look but mail flows; `fail` and
# `error` (could not check) are what makes `mailroom dns --check` exit 1.
OK, WARN, FAIL, ERROR = "ok", "warn", "fail", "error"

# A backup older than this is a failing check (a daily schedule missed a day and a half).
BACKUP_MAX_AGE = 36 * 3600
# Certificate days left below which the check warns, and fails.
CERT_WARN_DAYS, CERT_FAIL_DAYS = 21, 7


@dataclass(frozen=True)
class Check:
    kind: str  # MX, SPF, DKIM, DMARC, MTA-STS, TLS-RPT, A, PTR, FCDNS, TLSA, DNSBL, CERT, BACKUP, SPAM
    name: str  # what was looked at: a DNS name, a file
    level: str  # ok, warn, fail, error
    state: str  # the word shown: present, missing, different, weak, error, listed, expiring, ...
    expected: str = ""
    found: str = ""
    fix: str = ""
    note: str = ""

    @property
    def failing(self) -> bool:
        return self.level in (FAIL, ERROR)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    unreachable: str = ""  # set when DNS gave no answer at all: then no DNS check means anything

    @property
    def ok(self) -> bool:
        return not self.unreachable and not any(c.failing for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "unreachable": self.unreachable, "checks": [asdict(c) for c in self.checks]}


class Watched:
    """A resolver that notes whether any question got an answer (an empty one counts)."""

    def __init__(self, inner: Resolver) -> None:
        self.inner = inner
        self.answered = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def query(self, name: str, rdtype: str) -> list[Any]:
        try:
            found = self.inner.query(name, rdtype)
        except DNSTempError as exc:
            with self._lock:
                self.failures.append(str(exc))
            raise
        with self._lock:
            self.answered += 1
        return found


def in_parallel(jobs: list[Callable[[], list[Check]]]) -> list[Check]:
    """Run the jobs at once; their checks in the jobs' order."""
    if not jobs:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(jobs), 24)) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [c for f in futures for c in f.result()]


def _unreachable(watched: Watched, nameservers: list[str], timeout: float) -> str:
    if watched.answered or not watched.failures:
        return ""
    where = ", ".join(nameservers) if nameservers else "the system's resolvers (/etc/resolv.conf)"
    return (f"DNS cannot be reached: no answer from {where} within {timeout:g} s "
            f"({watched.failures[0]}); nothing was checked. Set [dns] nameservers to a resolver that answers.")


# --- the records of one domain ------------------------------------------------------


def _published(resolver: Resolver, r: Record) -> list[str]:
    if r.rdtype == "MX":
        return [f"{p} {x}" for p, x in resolver.query(r.name, "MX")]
    if r.rdtype == "TXT":
        return [t.decode("utf-8", "replace") for t in txt(resolver, r.name)]
    return [str(v) for v in resolver.query(r.name, r.rdtype)]


def record_check(r: Record, resolver: Resolver, host_addresses: Callable[[], list[str]]) -> Check:
    """One suggested record against what DNS has."""
    zone_line = f"{r.name}. IN {r.rdtype} " + (r.value if r.rdtype == "MX" else f'"{r.value}"')
    try:
        found = _published(resolver, r)
    except DNSTempError as exc:
        return Check(r.kind, r.name, ERROR, "error", r.value, str(exc),
                     "the DNS question could not be answered now; run the check again")
    if not found:
        return Check(r.kind, r.name, FAIL, "missing", r.value, "", f"publish: {zone_line}")
    state = r.judge(found)
    level = {"present": OK, "weak": WARN}.get(state, FAIL)
    shown = " | ".join(found)
    if level == OK:
        return Check(r.kind, r.name, OK, state, r.value, shown)
    note = _spf_note(r, resolver, host_addresses) if r.kind == "SPF" else _weak_note(r.kind, found)
    return Check(r.kind, r.name, level, state, r.value, shown, f"replace it with: {zone_line}", note)


def _weak_note(kind: str, found: list[str]) -> str:
    if kind == "DMARC":
        tags = dmarc_tags(found[0]) if len(found) == 1 else {}
        if tags.get("p") == "none":
            return "p=none only asks for reports; after a week of them, change to p=quarantine"
        if tags.get("pct", "100") != "100":
            return "pct below 100 applies the policy to only part of the failing mail"
    if kind == "SPF":
        return "~all (softfail) lets receivers accept mail that fails; -all says refuse it"
    return ""


def _spf_note(r: Record, resolver: Resolver, host_addresses: Callable[[], list[str]]) -> str:
    """Whether the published SPF record lets this host's addresses pass, whatever its text."""
    from common.dns import Resolver as AsyncResolver
    from common.dns import Wire
    from mta.auth.checks import check_spf

    domain = r.name
    try:
        addresses = host_addresses()
    except DNSTempError:
        return ""
    if not addresses:
        return ""
    # SPF is evaluated the way the MTA does (mta/auth/spf.py, asynchronous), asking the same nameservers
    # (or the resolver itself, when it also answers asynchronously, as the tests' dictionary does).
    inner = getattr(resolver, "inner", resolver)  # behind Watched
    wire: AsyncResolver
    if hasattr(inner, "lookup"):
        wire = cast("AsyncResolver", inner)
    else:
        wire = Wire(getattr(inner, "nameservers", ()), getattr(inner, "timeout", 10.0))

    def passes(address: str) -> bool:
        with contextlib.closing(asyncio.new_event_loop()) as loop:
            return loop.run_until_complete(check_spf(address, f"postmaster@{domain}", domain, wire)).result == "pass"

    failing = [a for a in addresses if not passes(a)]
    if failing:
        return f"with it, mail from this host ({', '.join(failing)}) fails SPF"
    return "it lets this host's addresses pass SPF, but does not follow the MX records as the suggestion does"


def dmarc_tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            tags[k.strip().lower()] = v.strip()
    return tags


def domain_checks(records: list[Record], resolver: Resolver, host: str) -> list[Check]:
    """Each suggested record of a domain, asked at once."""
    addresses = _Memo(lambda: host_addresses(resolver, host))
    return in_parallel([(lambda r=r: [record_check(r, resolver, addresses)]) for r in records])  # type: ignore[misc]


class _Memo:
    """A lookup done once, however many checks need it (SPF's evaluation of our addresses)."""

    def __init__(self, fn: Callable[[], list[str]]) -> None:
        self.fn = fn
        self.lock = threading.Lock()
        self.value: list[str] | None = None

    def __call__(self) -> list[str]:
        with self.lock:
            if self.value is None:
                self.value = self.fn()
            return self.value


def host_addresses(resolver: Resolver, host: str) -> list[str]:
    return [str(a) for t in ("A", "AAAA") for a in resolver.query(host, t)]


# --- the host -------------------------------------------------------------------------


def host_checks(cfg: Config, resolver: Resolver) -> list[Check]:
    """A/AAAA, then PTR and FCDNS per address, the TLSA record, and the DNS blocklists."""
    host = cfg.mailroom.hostname.rstrip(".").lower()
    try:
        addresses = host_addresses(resolver, host)
    except DNSTempError as exc:
        return [Check("A", host, ERROR, "error", "the address of the mail host", str(exc), "run the check again")]
    out: list[Check] = []
    if not addresses:
        out.append(Check("A", host, FAIL, "missing", "the address of the mail host", "",
                         f"publish {host}. IN A <address> (and AAAA for IPv6)"))
    else:
        out.append(Check("A", host, OK, "present", "the address of the mail host", ", ".join(addresses)))
    jobs: list[Callable[[], list[Check]]] = [(lambda a=a: reverse_checks(host, a, resolver)) for a in addresses]  # type: ignore[misc]
    jobs.append(lambda: [tlsa_check(cfg, host, resolver)])
    jobs += [(lambda a=a, z=z: [dnsbl_check(a, z, resolver)])  # type: ignore[misc]
             for a in addresses for z in cfg.filter.dnsbl_zones]
    return out + in_parallel(jobs)


def reverse_checks(host: str, address: str, resolver: Resolver) -> list[Check]:
    """PTR of the address names the host, and that name leads back to the address (FCDNS)."""
    name = ipaddress.ip_address(address).reverse_pointer
    want = f"{host}."
    fix = f"ask whoever owns {address} (usually the hosting provider) to set its PTR to {host}"
    try:
        ptrs = [str(p).lower().rstrip(".") for p in resolver.query(name, "PTR")]
    except DNSTempError as exc:
        return [Check("PTR", name, ERROR, "error", want, str(exc), "run the check again")]
    if not ptrs:
        return [Check("PTR", name, FAIL, "missing", want, "", fix)]
    out = [Check("PTR", name, OK if host in ptrs else FAIL, "present" if host in ptrs else "different", want,
                 " | ".join(ptrs), "" if host in ptrs else fix)]
    # Forward-confirmed: some name the PTR gives has the address among its own (RFC 8601 2.7.3's iprev).
    back: list[str] = []
    try:
        for p in ptrs:
            back += host_addresses(resolver, p)
    except DNSTempError as exc:
        return out + [Check("FCDNS", address, ERROR, "error", f"{address} <- {' | '.join(ptrs)}", str(exc),
                            "run the check again")]
    same = address in back
    out.append(Check("FCDNS", address, OK if same else FAIL, "present" if same else "different",
                     f"{' | '.join(ptrs)} -> {address}", f"{' | '.join(ptrs)} -> {', '.join(back) or 'nothing'}",
                     "" if same else f"publish {ptrs[0]}. IN A {address}, or set the PTR to {host}"))
    return out


def tlsa_value(cfg: Config) -> str:
    """The DANE-EE record of our certificate's public key (RFC 7671: 3 1 1, SHA-256 of the SPKI)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cfg.resolve(cfg.tls.cert).read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


def tlsa_check(cfg: Config, host: str, resolver: Resolver) -> Check:
    name = f"_25._tcp.{host}"
    try:
        want = tlsa_value(cfg)
    except (OSError, ValueError) as exc:
        return Check("TLSA", name, ERROR, "error", "", f"cannot read [tls] cert: {exc}", "fix [tls] cert")
    fix = f"publish {name}. IN TLSA {want} (DANE needs the zone signed with DNSSEC; " \
          "keep the key when the certificate is renewed, or publish the new record first)"
    try:
        found = [" ".join(str(v).split()[:3]) + " " + "".join(str(v).split()[3:]).lower()
                 for v in resolver.query(name, "TLSA")]
    except DNSTempError as exc:
        return Check("TLSA", name, ERROR, "error", want, str(exc), "run the check again")
    if not found:
        # Optional: without DNSSEC there is no DANE.  A wrong record, though, stops mail from DANE senders.
        return Check("TLSA", name, WARN, "optional", want, "", fix, "optional: senders that check DANE can then "
                     "insist on TLS with this certificate")
    if want in found:
        return Check("TLSA", name, OK, "present", want, " | ".join(found))
    return Check("TLSA", name, FAIL, "different", want, " | ".join(found), fix,
                 "senders that check DANE refuse to deliver while no record matches the certificate")


def dnsbl_check(address: str, zone: str, resolver: Resolver) -> Check:
    ip = ipaddress.ip_address(address)
    label = ".".join(reversed(ip.exploded.replace(":", ""))) if ip.version == 6 else ".".join(
        reversed(address.split(".")))
    name = f"{label}.{zone}"
    what = f"{address} at {zone}"
    try:
        codes = [str(a) for a in resolver.query(name, "A")]
    except DNSTempError as exc:
        return Check("DNSBL", what, ERROR, "error", "not listed", str(exc), "run the check again")
    if not codes:
        return Check("DNSBL", what, OK, "clean", "not listed", "not listed")
    if all(c.startswith("127.255.255.") for c in codes):
        # Spamhaus's way of saying "not answered for your resolver" (a public resolver, or too many queries).
        return Check("DNSBL", what, ERROR, "error", "not listed", f"refused: {', '.join(codes)}",
                     f"{zone} does not answer through this resolver; use your own resolver")
    try:
        reason = " ".join(t.decode("utf-8", "replace") for t in txt(resolver, name))
    except DNSTempError:
        reason = ""
    found = ", ".join(codes) + (f" ({reason})" if reason else "")
    return Check("DNSBL", what, FAIL, "listed", "not listed", found,
                 f"find out why at {zone}'s web site, stop the cause, then ask to be removed")


# --- local ----------------------------------------------------------------------------


def cert_check(cfg: Config, now: dt.datetime | None = None) -> Check:
    from cryptography import x509

    path = cfg.resolve(cfg.tls.cert)
    host = cfg.mailroom.hostname.rstrip(".").lower()
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        return Check("CERT", str(path), FAIL, "unreadable", "a PEM certificate", str(exc), "fix [tls] cert")
    now = now or dt.datetime.now(dt.UTC)
    left = cert.not_valid_after_utc - now
    days = left.total_seconds() / 86400
    until = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    renew = "renew the certificate (or let ACME renew it) and reload"
    if days < 0:
        return Check("CERT", str(path), FAIL, "expired", f"valid beyond {CERT_WARN_DAYS} days", f"expired {until}",
                     renew)
    if days < CERT_FAIL_DAYS:
        return Check("CERT", str(path), FAIL, "expiring", f"valid beyond {CERT_WARN_DAYS} days",
                     f"expires {until} ({days:.0f} days)", renew)
    if days < CERT_WARN_DAYS:
        return Check("CERT", str(path), WARN, "expiring", f"valid beyond {CERT_WARN_DAYS} days",
                     f"expires {until} ({days:.0f} days)", renew)
    found = f"valid until {until} ({days:.0f} days)"
    try:
        names = [n.lower() for n in cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if host not in names and not any(n.startswith("*.") and host.split(".", 1)[-1] == n[2:] for n in names):
        return Check("CERT", str(path), WARN, "other name", f"a certificate for {host}",
                     f"{found}, for {', '.join(names) or 'no DNS name'}", f"get a certificate for {host}")
    if cert.issuer == cert.subject:
        return Check("CERT", str(path), WARN, "self-signed", "a certificate from a CA", found,
                     "mail clients warn and MTA-STS senders refuse a self-signed certificate: get one from a CA "
                     "(ACME)")
    return Check("CERT", str(path), OK, "ok", f"valid beyond {CERT_WARN_DAYS} days", found)


def backup_check(cfg: Config, now: float | None = None) -> Check:
    last = backupstatus.read(cfg.run_dir)
    now = time.time() if now is None else now
    where = str(cfg.run_dir / backupstatus.FILE)
    want = "a successful backup in the last 36 hours"
    if last is None:
        return Check("BACKUP", where, FAIL, "none", want, "no backup has run",
                     'mailroom backup init, then set [backup] at = "03:30" (or run mailroom backup)')
    age = now - last.last_ok if last.last_ok else None
    when = _ago(age) if age is not None else "never"
    if not last.ok:
        return Check("BACKUP", where, FAIL, "failed", want,
                     f"the last backup failed ({last.error}); the last good one: {when}",
                     "fix the cause, then run mailroom backup")
    if age is not None and age > BACKUP_MAX_AGE:
        return Check("BACKUP", where, FAIL, "old", want, f"the last one: {when}",
                     'check that [backup] at is set and the schedule runs (mailroom status)')
    return Check("BACKUP", where, OK, "ok", want, f"{last.snapshot}, {when}")


def spam_check(cfg: Config) -> Check:
    """Whether rspamd scans incoming mail, and whether its DNS blocklists count
    (cli/rspamd.py: only behind a resolver on this host)."""
    from cli import rspamd

    f = cfg.filter
    want = "rspamd scanning mail, its blocklists asked through a resolver of our own"
    if not f.rspamd:
        return Check("SPAM", "[filter] rspamd", WARN, "off", want, "no content filter",
                     'set [filter] rspamd = "supervised" (apt-get install rspamd redis-server) and restart')
    if not f.supervised:
        return Check("SPAM", "[filter] rspamd", OK, "elsewhere", want,
                     f"rspamd at {f.rspamd} (its blocklists are its own)")
    down = rspamd.why_not(cfg)
    if down:
        return Check("SPAM", "[filter] rspamd", FAIL, "down", want, down, "install what is missing and restart")
    servers = ", ".join(rspamd.resolvers(cfg)) or "none"
    if not rspamd.dnsbl_active(cfg):
        return Check("SPAM", "[filter] rspamd", WARN, "no lists", want,
                     f"rspamd scans; its DNS blocklists are off: its resolvers ({servers}) are not on this host, "
                     "and the list operators refuse public resolvers",
                     'set [dns] resolver = "unbound" (a resolver of our own) and restart')
    return Check("SPAM", "[filter] rspamd", OK, "ok", want, f"rspamd scans, with DNS blocklists (through {servers})")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


# --- together -------------------------------------------------------------------------


def for_domain(cfg: Config, domain: str, resolver: Resolver) -> Report:
    """`mailroom dns DOMAIN --check`: the domain's records and the host's reverse DNS."""
    from cli.dns import records

    watched = Watched(resolver)
    host = cfg.mailroom.hostname.rstrip(".").lower()
    checks = in_parallel([lambda: domain_checks(records(cfg, domain), watched, host),
                          lambda: host_checks(cfg, watched)])
    return Report(checks, _unreachable(watched, cfg.dns.nameservers, cfg.dns.timeout))


def everything(cfg: Config, resolver: Resolver) -> Report:
    """`mailroom status-checks` and the admin page: every domain, the host, the certificate, the backup."""
    from cli.dns import records

    watched = Watched(resolver)
    host = cfg.mailroom.hostname.rstrip(".").lower()
    jobs: list[Callable[[], list[Check]]] = [
        (lambda d=d: domain_checks(records(cfg, d), watched, host)) for d in cfg.mailroom.domains  # type: ignore[misc]
    ]
    jobs.append(lambda: host_checks(cfg, watched))
    checks = in_parallel(jobs) + [cert_check(cfg), backup_check(cfg), spam_check(cfg)]
    return Report(checks, _unreachable(watched, cfg.dns.nameservers, cfg.dns.timeout))


def render(report: Report) -> list[str]:
    """One line per check; what was wanted, found and the fix below any that is not ok."""
    if report.unreachable:
        return [report.unreachable]
    lines = []
    for c in report.checks:
        line = f"{c.state:9} {c.kind:8} {c.name}"
        if c.kind in ("A", "FCDNS") and c.level == OK:
            line += f" -> {c.found}" if c.kind == "A" else ""
        if c.level != OK:
            if c.expected:
                line += f"\n          want: {c.expected}"
            if c.found:
                line += f"\n          have: {c.found}"
            if c.note:
                line += f"\n          note: {c.note}"
            if c.fix:
                line += f"\n          fix:  {c.fix}"
        lines.append(line)
    return lines


def run_all(cfg: Config) -> Report:
    """Every check, asking `[dns] nameservers` (what the admin page shows)."""
    from mta.auth.authdns import SyncResolver

    return everything(cfg, SyncResolver(cfg.dns.nameservers, cfg.dns.timeout))


# --- `mailroom status-checks` ---------------------------------------------------------


def run(args: Any, cfg: Config, resolver: Resolver | None = None) -> int:
    import json

    from mta.auth.authdns import SyncResolver

    report = everything(cfg, resolver or SyncResolver(cfg.dns.nameservers, cfg.dns.timeout))
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("\n".join(render(report)))
        bad = sum(c.failing for c in report.checks)
        if not report.unreachable:
            print("every check passed" if not bad else f"{bad} check(s) failing")
    return 0 if report.ok else 1
