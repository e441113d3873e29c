"""`mailroom dns DOMAIN [--check]`: the DNS records a mail domain needs, and whether they are there.

Without --check it prints the records in zone-file form: MX, SPF, one DKIM
record per key (old selectors stay until their mail has arrived), DMARC,
MTA-STS and TLS-RPT, and the reverse DNS the host name needs.  With --check
it asks the configured resolver (`[dns] nameservers`) for each and reports it
as present, missing or different; the exit status is 1 when any is not present.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable
from dataclasses import dataclass

from cli import unbound
from cli.dkim import zone_lines
from common import config as configmod
from mta import dkim
from mta.authdns import DNSTempError, Resolver, SyncResolver, txt


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dns", help="the DNS records to publish for a domain (--check: compare with DNS)")
    p.add_argument("domain")
    p.add_argument("--check", action="store_true", help="ask DNS and report present / missing / different")


@dataclass(frozen=True)
class Record:
    kind: str  # MX, SPF, DKIM, DMARC, MTA-STS, TLS-RPT, PTR
    name: str
    rdtype: str
    value: str
    # published values -> "present" or "different" (an empty list is "missing")
    judge: Callable[[list[str]], str]


def _same(expected: str) -> Callable[[list[str]], str]:
    def judge(found: list[str]) -> str:
        return "present" if any(_norm(f) == _norm(expected) for f in found) else "different"

    return judge


def _starts(prefix: str) -> Callable[[list[str]], str]:
    def judge(found: list[str]) -> str:
        return "present" if any(f.lower().startswith(prefix.lower()) for f in found) else "different"

    return judge


def _norm(text: str) -> str:
    return " ".join(text.replace(";", "; ").split()).lower().rstrip(".")


def records(cfg: configmod.Config, domain: str) -> list[Record]:
    host = cfg.mailroom.hostname.rstrip(".")
    out = [
        Record("MX", domain, "MX", f"10 {host}.", _mx_judge(host)),
        Record("SPF", domain, "TXT", "v=spf1 mx -all", _spf_judge),
    ]
    for k in dkim.load_keys(cfg.resolve(cfg.dkim.key_dir)):
        if k.domain == domain:
            out.append(Record("DKIM", k.dns_name, "TXT", dkim.public_record(k), _same(dkim.public_record(k))))
    out += [
        Record("DMARC", f"_dmarc.{domain}", "TXT", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}",
               _starts("v=DMARC1")),
        Record("MTA-STS", f"_mta-sts.{domain}", "TXT", "v=STSv1; id=1", _starts("v=STSv1")),
        Record("TLS-RPT", f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua=mailto:postmaster@{domain}",
               _starts("v=TLSRPTv1")),
    ]
    return out


def _mx_judge(host: str) -> Callable[[list[str]], str]:
    def judge(found: list[str]) -> str:
        names = [f.split()[-1].lower().rstrip(".") for f in found]
        return "present" if host.lower() in names else "different"

    return judge


def _spf_judge(found: list[str]) -> str:
    spf = [f for f in found if f.lower().startswith("v=spf1")]
    if not spf:
        return "missing"
    # Two SPF records are a permanent error for every receiver (RFC 7208 4.5).
    return "present" if len(spf) == 1 and any(m in spf[0] for m in (" mx", " a", "ip4:", "ip6:", "include:")) \
        else "different"


def render(cfg: configmod.Config, domain: str) -> str:
    host = cfg.mailroom.hostname.rstrip(".")
    lines = [f"; DNS records for {domain} (mail host {host})", ""]
    for r in records(cfg, domain):
        if r.kind == "DKIM":
            continue
        lines.append(f"; {r.kind}")
        lines.append(f'{r.name}. IN {r.rdtype} {_quote(r)}')
    keys = [k for k in dkim.load_keys(cfg.resolve(cfg.dkim.key_dir)) if k.domain == domain]
    lines.append("; DKIM (one record per key; keep old selectors published while their mail may be in transit)")
    lines += zone_lines(keys) or [f"; none yet: mailroom dkim keygen {domain}"]
    lines += [
        f"; MTA-STS also needs https://mta-sts.{domain}/.well-known/mta-sts.txt containing:",
        ";   version: STSv1",
        ";   mode: testing",
        f";   mx: {host}",
        ";   max_age: 604800",
        "; (change id= in the TXT record whenever the policy file changes)",
        "; Reverse DNS (set by whoever owns the address, usually the hosting provider):",
        f";   {host}. IN A <address>   and   the PTR of <address> -> {host}.",
    ]
    return "\n".join(lines) + "\n"


def _quote(r: Record) -> str:
    return r.value if r.rdtype == "MX" else f'"{r.value}"'


def check(cfg: configmod.Config, domain: str, resolver: Resolver) -> tuple[list[str], bool]:
    """One line per record; whether all are present."""
    ok = True
    out: list[str] = []
    for r in records(cfg, domain):
        try:
            found = _published(resolver, r)
        except DNSTempError as exc:
            state, found = "error", [str(exc)]
        else:
            state = r.judge(found) if found else "missing"
        ok &= state == "present"
        line = f"{state:9} {r.kind:8} {r.name}"
        if state != "present":
            line += f"\n          want: {r.value}"
            if found:
                line += "\n          have: " + " | ".join(found)
        out.append(line)
    for line, good in _reverse(cfg.mailroom.hostname.rstrip("."), resolver):
        ok &= good
        out.append(line)
    return out, ok


def _published(resolver: Resolver, r: Record) -> list[str]:
    if r.rdtype == "MX":
        return [f"{p} {x}" for p, x in resolver.query(r.name, "MX")]
    return [t.decode("utf-8", "replace") for t in txt(resolver, r.name)]


def _reverse(host: str, resolver: Resolver) -> list[tuple[str, bool]]:
    try:
        addrs = [str(a) for t in ("A", "AAAA") for a in resolver.query(host, t)]
    except DNSTempError as exc:
        return [(f"{'error':9} {'A':8} {host}  {exc}", False)]
    if not addrs:
        return [(f"{'missing':9} {'A':8} {host}\n          want: the address of the mail host", False)]
    out = [(f"{'present':9} {'A':8} {host} -> {', '.join(addrs)}", True)]
    for a in addrs:
        name = ipaddress.ip_address(a).reverse_pointer
        try:
            ptrs = [str(p).lower().rstrip(".") for p in resolver.query(name, "PTR")]
        except DNSTempError as exc:
            out.append((f"{'error':9} {'PTR':8} {name}  {exc}", False))
            continue
        state = "present" if host.lower() in ptrs else ("different" if ptrs else "missing")
        line = f"{state:9} {'PTR':8} {name}"
        if state != "present":
            line += f"\n          want: {host}." + (f"\n          have: {' | '.join(ptrs)}" if ptrs else "")
        out.append((line, state == "present"))
    return out


def run(args: argparse.Namespace, cfg: configmod.Config, resolver: Resolver | None = None) -> int:
    domain = args.domain.lower().rstrip(".")
    if not cfg.is_local_domain(domain):
        print(f"{domain}: not a local domain ({', '.join(cfg.mailroom.domains)})", file=sys.stderr)
        return 1
    if not args.check:
        print(render(cfg, domain), end="")
        return 0
    lines, ok = check(cfg, domain, resolver or SyncResolver(cfg.dns.nameservers, cfg.dns.timeout))
    print("\n".join(lines))
    print(unbound.validation_line(cfg))  # whether the resolver the daemons use validates DNSSEC
    print("all records present" if ok else "some records are missing or different")
    return 0 if ok else 1
