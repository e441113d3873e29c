"""`mailroom dns DOMAIN [--check]`: the DNS records a mail domain needs, and whether they are there.

Without --check it prints the records in zone-file form: MX, SPF, one DKIM
record per key (old selectors stay until their mail has arrived), DMARC,
MTA-STS (its id changes whenever the policy does) and TLS-RPT, the DANE
TLSA records of the MX host's current and next keys, the reverse DNS the
host name needs, and the SRV records mail clients look for (RFC 6186).  With --check
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
from common.tls import tlsa_3_1_1
from mta import dkim
from mta.authdns import DNSTempError, Resolver, SyncResolver, txt
from web import mta_sts


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
        Record("MTA-STS", f"_mta-sts.{domain}", "TXT", mta_sts.txt_record(cfg), _starts("v=STSv1")),
        Record("TLS-RPT", f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua=mailto:postmaster@{domain}",
               _starts("v=TLSRPTv1")),
    ]
    return out


def tlsa_records(cfg: configmod.Config) -> list[Record]:
    """DANE-EE `3 1 1` (RFC 7672 3.1.1: the SHA-256 of the key, so a renewal that keeps the key
    keeps the record true) for the MX host's current key and, once there is one, the next
    (`mailroom cert renew --new-key` moves to it; publish it well before)."""
    name = f"_25._tcp.{cfg.mailroom.hostname.rstrip('.')}"
    out: list[Record] = []
    keys = [cfg.resolve(cfg.tls.key), cfg.resolve(cfg.acme.dir) / "next-key.pem"]
    for path in keys:
        try:
            value = tlsa_3_1_1(path.read_bytes())
        except (OSError, ValueError, TypeError):
            continue
        if all(r.value != value for r in out):
            out.append(Record("TLSA", name, "TLSA", value, _same(value)))
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
    lines.append(f"; MTA-STS: the web program serves https://mta-sts.{domain}{mta_sts.PATH} ([web] https, "
                 "a certificate naming the host: `mailroom cert request`); it reads:")
    lines += [f";   {line}" for line in mta_sts.policy(cfg).splitlines()]
    lines.append("; (the id in the TXT record above changes with the policy: publish it again after a change)")
    tlsa = tlsa_records(cfg)
    if tlsa:
        lines.append("; DANE (in a DNSSEC-signed zone only): the MX host's current key"
                     + (" and the next one (publish both; renewals keep the key)" if len(tlsa) > 1 else ""))
        lines += [f"{r.name}. IN TLSA {r.value}" for r in tlsa]
    lines += [
        "; Reverse DNS (set by whoever owns the address, usually the hosting provider):",
        f";   {host}. IN A <address>   and   the PTR of <address> -> {host}.",
    ]
    lines += srv_lines(cfg, domain)
    return "\n".join(lines) + "\n"


def srv_lines(cfg: configmod.Config, domain: str) -> list[str]:
    """SRV records that let a mail client find its servers from the address alone (RFC 6186;
    _submissions, RFC 8314 5.1), for the listeners as configured: a service that is off
    gets the target "." (RFC 6186 3.4: decidedly not available)."""
    host = cfg.mailroom.hostname.rstrip(".")
    imap = cfg.imap.enabled
    # The priority counts across the services of one kind (RFC 6186 3.4): implicit TLS
    # first, as RFC 8314 asks, and IMAP before POP3.
    services = [
        ("_submissions", 0, "msa.submissions", "implicit TLS (RFC 8314)"),
        ("_submission", 10, "msa.submission", "STARTTLS"),
        ("_imaps", 0, "imap.imaps" if imap else "", "implicit TLS"),
        ("_imap", 10, "imap.imap" if imap else "", "STARTTLS"),
        ("_pop3s", 20, "imap.pop3s" if imap else "", "implicit TLS"),
    ]
    out = ["; SRV: where mail clients find the servers (RFC 6186, RFC 8314), the ports as configured"]
    for name, priority, key, note in services:
        port = _client_port(cfg, key)
        target = f"{priority} 1 {port} {host}." if port else "0 0 0 ."
        out.append(f"{name}._tcp.{domain}. IN SRV {target}   ; {note}" + ("" if port else ": off here"))
    return out


def _client_port(cfg: configmod.Config, key: str) -> int | None:
    """The TCP port a client reaches `key`'s listener on; None when it is off or a Unix socket."""
    if not key:
        return None
    if key.startswith("imap."):
        listen = getattr(cfg.imap, key.split(".", 1)[1])
        return configmod.parse_hostport(listen)[1] if listen else None
    where = cfg.endpoint(key)
    return None if where.is_unix else where.port


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
