"""`mailroom dkim keygen DOMAIN [--selector S]` and `mailroom dkim list`: the DKIM keys.

keygen writes a new key set (RSA-2048 and Ed25519, owner-only files in
`[dkim] key_dir`) and prints the two TXT records to publish.  The MTA signs
with a domain's newest set unless `[dkim] selectors` names one, so to roll a
key: pin the current selector there, run keygen, publish the new records, wait
for them to be seen, then point the setting at the new selector; the old
records stay published until no mail signed with them can still be in transit.
"""

from __future__ import annotations

import argparse
import sys

from common import config as configmod
from mta.auth import dkim


def zone_lines(keys: list[dkim.Key]) -> list[str]:
    """The TXT records, in zone-file form, split into strings of at most 255 octets."""
    out = []
    for k in keys:
        text = dkim.public_record(k)
        chunks = " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))
        out.append(f"{k.dns_name}. IN TXT ( {chunks} )")
    return out


def keygen(cfg: configmod.Config, domain: str, selector: str | None) -> int:
    domain = domain.lower().rstrip(".")
    if not cfg.is_local_domain(domain):
        print(f"{domain}: not a local domain ({', '.join(cfg.mailroom.domains)})", file=sys.stderr)
        return 1
    try:
        keys = dkim.generate(cfg.resolve(cfg.dkim.key_dir), domain, selector or dkim.default_selector())
    except (ValueError, FileExistsError) as exc:
        print(f"mailroom dkim: {exc}", file=sys.stderr)
        return 1
    for line in zone_lines(keys):
        print(line)
    return 0


def run(args: argparse.Namespace, cfg: configmod.Config) -> int:
    if args.action == "keygen":
        return keygen(cfg, args.domain, args.selector)
    keys = dkim.load_keys(cfg.resolve(cfg.dkim.key_dir))
    for domain in sorted({k.domain for k in keys}):
        used = {k.selector for k in dkim.signing_keys(keys, domain, cfg.dkim.selectors)}
        for k in (k for k in keys if k.domain == domain):
            mark = "signing" if k.selector in used else "not used"
            print(f"{k.domain} {k.selector} {k.algorithm} ({mark})")
    return 0
