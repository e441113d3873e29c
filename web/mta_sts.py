"""The MTA-STS policy we publish for our own domains (RFC 8461), and its id.

A sending MTA that finds `_mta-sts.DOMAIN IN TXT "v=STSv1; id=..."` fetches
`https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (the web program's `[web]
https` listener serves it, web/public.py) and, in `enforce` mode, delivers to
DOMAIN only over TLS to an MX host the policy names, with a certificate valid
for that name.  Senders cache the policy for `max_age` and fetch it again only
when the TXT record's id changes, so the id is derived from the policy text:
change `[mta_sts]` and `mailroom dns` prints a new id to publish.

One policy serves every local domain: their MX is this host.
"""

from __future__ import annotations

import hashlib

from common.config import Config

PATH = "/.well-known/mta-sts.txt"
HOST_PREFIX = "mta-sts."


def mx_patterns(cfg: Config) -> list[str]:
    return cfg.mta_sts.mx or [cfg.mailroom.hostname.lower().rstrip(".")]


def policy(cfg: Config) -> str:
    """The policy file (RFC 8461 3.2), CRLF line ends."""
    lines = ["version: STSv1", f"mode: {cfg.mta_sts.mode}"]
    lines += [f"mx: {m}" for m in mx_patterns(cfg)]
    lines.append(f"max_age: {int(cfg.mta_sts.max_age)}")
    return "\r\n".join(lines) + "\r\n"


def policy_id(cfg: Config) -> str:
    """The TXT record's id (1 to 32 letters and digits): the start of the policy's SHA-256,
    so it changes exactly when the policy does."""
    return hashlib.sha256(policy(cfg).encode()).hexdigest()[:20]


def txt_record(cfg: Config) -> str:
    return f"v=STSv1; id={policy_id(cfg)}"


def domain_of_host(cfg: Config, host: str) -> str | None:
    """The local domain whose policy host `host` (a Host header, port allowed) is, or None."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.lower().rstrip(".")
    if not name.startswith(HOST_PREFIX):
        return None
    domain = name[len(HOST_PREFIX):]
    return domain if cfg.is_local_domain(domain) else None
