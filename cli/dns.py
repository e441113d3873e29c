"""`mailroom dns DOMAIN [--check]`: the DNS records a mail domain needs, and whether they are there.

Without --check it prints the records in zone-file form: MX, SPF, one DKIM
record per key (old selectors stay until their mail has arrived), DMARC,
MTA-STS (its id changes whenever the policy does) and TLS-RPT, the DANE
TLSA records of the MX host's current and next keys, the reverse DNS the host
name needs (with a warning when the host name is one the Internet cannot reach,
such as localhost), and the SRV records mail clients look for (RFC 6186).  With
--check it asks the configured resolver (`[dns] nameservers`) for all of them at
once and reports each as present, weak (right, but could be stronger: DMARC
p=none, SPF ~all), missing or different, comparing with what it suggests, with
what to publish instead (cli/checks.py, shared with the admin page).  The exit
status is 1 when any is missing or different, 2 when DNS could not be reached.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from cli import checks, unbound
from cli.dkim import zone_lines
from common import config as configmod
from common.tls import tlsa_3_1_1
from mta.auth import dkim
from mta.auth.authdns import Resolver, SyncResolver
from web import mta_sts


@dataclass(frozen=True)
class Record:
    kind: str  # MX, SPF, DKIM, DMARC, MTA-STS, TLS-RPT, PTR
    name: str
    rdtype: str
    value: str
    # published values -> "present", "weak" or "different" (an empty list is "missing")
    judge: Callable[[list[str]], str]


def _same(expected: str) -> Callable[[list[str]], str]:
    def judge(found: list[str]) -> str:
        return "present" if any(_norm(f) == _norm(expected) for f in found) else "different"

    return judge


def _starts(prefix: str, *needed: str) -> Callable[[list[str]], str]:
    """A record of this kind (its prefix), with the tags a receiver needs (`id=`, `rua=`)."""

    def judge(found: list[str]) -> str:
        mine = [f for f in found if f.lower().startswith(prefix.lower())]
        if len(mine) != 1:
            return "different"  # none of this kind, or two (a receiver then uses neither)
        tags = {part.split("=", 1)[0].strip().lower() for part in mine[0].split(";") if "=" in part}
        return "present" if all(n in tags for n in needed) else "different"

    return judge


def _norm(text: str) -> str:
    return " ".join(text.replace(";", "; ").split()).lower().rstrip(".")


def records(cfg: configmod.Config, domain: str) -> list[Record]:
    host = cfg.mailroom.hostname.rstrip(".")
    out = [
        Record("MX", domain, "MX", f"10 {host}.", _mx_judge(host)),
        Record("SPF", domain, "TXT", SPF, _spf_judge),
    ]
    for k in dkim.load_keys(cfg.resolve(cfg.dkim.key_dir)):
        if k.domain == domain:
            out.append(Record("DKIM", k.dns_name, "TXT", dkim.public_record(k), _same(dkim.public_record(k))))
    out += [
        Record("DMARC", f"_dmarc.{domain}", "TXT", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}",
               _dmarc_judge),
        # The id must be the current one: senders fetch the policy again only when it changes.
        Record("MTA-STS", f"_mta-sts.{domain}", "TXT", mta_sts.txt_record(cfg), _same(mta_sts.txt_record(cfg))),
        Record("TLS-RPT", f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua=mailto:postmaster@{domain}",
               _starts("v=TLSRPTv1", "rua")),
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


SPF = "v=spf1 mx -all"


def _mx_judge(host: str) -> Callable[[list[str]], str]:
    def judge(found: list[str]) -> str:
        names = [f.split()[-1].lower().rstrip(".") for f in found]
        return "present" if host.lower() in names else "different"

    return judge


def _spf_judge(found: list[str]) -> str:
    """Our terms (`mx`) all there, and a hard fail for everyone else: other senders
    (`include:`, `ip4:`) may be added.  `~all` is weak; `?all`, `+all`, no `all` or
    two SPF records (a permanent error for every receiver, RFC 7208 4.5) are wrong."""
    spf = [f for f in found if f.lower().split(" ", 1)[0] == "v=spf1"]
    if len(spf) != 1:
        return "different"
    terms = spf[0].lower().split()[1:]
    wanted = SPF.split()[1:-1]
    if not terms or any(t not in terms for t in wanted) or any(t in ("+all", "?all", "all") for t in terms):
        return "different"
    if terms[-1] == "-all":
        return "present"
    return "weak" if terms[-1] == "~all" else "different"


def _dmarc_judge(found: list[str]) -> str:
    """p=quarantine or p=reject on all mail is what we suggest (either is right);
    p=none or a pct below 100 is a step on the way (weak); anything else is wrong."""
    mine = [f for f in found if f.lower().replace(" ", "").startswith("v=dmarc1")]
    if len(mine) != 1:
        return "different"  # two records: receivers use neither (RFC 7489 6.6.3)
    tags = checks.dmarc_tags(mine[0])
    p = tags.get("p", "").lower()
    if p not in ("none", "quarantine", "reject"):
        return "different"
    pct = tags.get("pct", "100")
    if p == "none" or pct != "100":
        return "weak"
    return "present"


def render(cfg: configmod.Config, domain: str) -> str:
    host = cfg.mailroom.hostname.rstrip(".")
    lines = [f"; DNS records for {domain} (mail host {host})", ""]
    warning = unreachable_host(host)
    if warning:
        lines += [f"; WARNING: {warning}", ""]
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


def run(args: argparse.Namespace, cfg: configmod.Config, resolver: Resolver | None = None) -> int:
    domain = args.domain.lower().rstrip(".")
    if not cfg.is_local_domain(domain):
        print(f"{domain}: not a local domain ({', '.join(cfg.mailroom.domains)})", file=sys.stderr)
        return 1
    if not args.check:
        warning = unreachable_host(cfg.mailroom.hostname)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        print(render(cfg, domain), end="")
        return 0
    report = checks.for_domain(cfg, domain, resolver or SyncResolver(cfg.dns.nameservers, cfg.dns.timeout))
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("\n".join(checks.render(report)))
        if not report.unreachable:  # (when it is, the one line above says all)
            print(unbound.validation_line(cfg))  # whether the resolver the daemons use validates DNSSEC
            weak = sum(c.level == checks.WARN for c in report.checks)
            print("some records are missing or different" if not report.ok else
                  "all records present" + (f"; {weak} could be better (see above)" if weak else ""))
    if report.unreachable:
        return 2
    return 0 if report.ok else 1


# Names that no other host can reach: special-use names (RFC 6761, RFC 2606) and
# a bare label.  An MX naming one of them receives nothing from the Internet.
_NOT_PUBLIC = ("localhost", "local", "test", "example", "invalid", "internal", "home.arpa", "lan")


def unreachable_host(hostname: str) -> str:
    """Why mail from the Internet could not reach `hostname`, or ""."""
    host = hostname.rstrip(".").lower()
    try:
        ipaddress.ip_address(host)
        return f"[mailroom] hostname = {host} is an address; an MX record must name a host (mailroom init --hostname)"
    except ValueError:
        pass
    if "." not in host or any(host == s or host.endswith("." + s) for s in _NOT_PUBLIC):
        return (f"[mailroom] hostname = {host} is not a public name: no mail from the Internet can reach it. "
                "Set it to this host's name in DNS (mail.example.org) before publishing these records")
    return ""
