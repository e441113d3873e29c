"""MTA-STS (RFC 8461), the sending side: a recipient domain's policy, fetched, checked and cached.

Discovery (RFC 8461 3): a TXT record at `_mta-sts.<domain>` says a policy
exists and names its version (`v=STSv1; id=...`); the policy itself is
fetched from `https://mta-sts.<domain>/.well-known/mta-sts.txt` with the
certificate verified for that name (mta/webfetch.py: HTTPS only, no
redirects, a deadline and a size limit).  It reads:

    version: STSv1
    mode: enforce            (or testing, or none)
    mx: mx1.example.net      (one line per allowed MX host name;
    mx: *.example.net         "*." allows exactly one more label)
    max_age: 86400           (seconds it may be cached, at most a year)

Caching (RFC 8461 3.3, 5.1): a policy is kept for its max_age, in a file that
survives restarts (trust on first use only protects if the first use is
remembered).  Every use looks at the TXT id (the resolver caches it for its
TTL); a new id means a new policy is fetched at once.  A policy older than a
day is fetched again in the background, so that a domain in daily use never
lets its cached copy expire.  When the TXT record is missing or the fetch
fails, an unexpired cached policy stays in force: an attacker who blocks
DNS or HTTPS must not be able to remove a policy.  With no cached policy a
failure means "no policy" (RFC 8461 3.3), logged and reported (TLS-RPT).

What is refused, each with one log line naming the domain and the reason:
a policy larger than `max_size`, one that takes longer than `timeout`, one
served over plain HTTP or with a certificate not valid for `mta-sts.<domain>`,
an answer other than 200 text/plain, a version other than STSv1, a missing
or unknown mode, a bad max_age, an enforce or testing policy without a
usable mx line.  An mx pattern with a wildcard anywhere but as the whole
leftmost label (`mx*.example.net`, `*.*.example.net`, `a.*.example.net`,
`*example.net`) is logged and dropped: it matches no host, so it can only
narrow where mail goes, never widen it.

What a policy means for delivery is mta/tlspolicy.py's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.clock import Clock
from mta import webfetch
from mta.tlsdns import LookupFailed, PolicyResolver

log = logging.getLogger("mtasts")

ENFORCE, TESTING, NONE = "enforce", "testing", "none"
MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: a year
REFRESH_AFTER = 86400.0  # fetch again in the background once a cached policy is this old
PATH = "/.well-known/mta-sts.txt"

# TLS-RPT result types of discovery failures (RFC 8460 4.3.2.2).
FETCH_ERROR = "sts-policy-fetch-error"
INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class PolicyError(Exception):
    """A policy that cannot be used: the message says why; `result` is its TLS-RPT result type."""

    def __init__(self, text: str, result: str = INVALID) -> None:
        super().__init__(text)
        self.result = result


@dataclass(frozen=True)
class Policy:
    id: str
    mode: str
    max_age: int
    mx: tuple[str, ...]  # the usable patterns, lower-case
    lines: tuple[str, ...]  # the policy as served, one line each (TLS-RPT's policy-string)
    fetched: dt.datetime
    expires: dt.datetime

    def allows(self, host: str) -> bool:
        """Whether MX host `host` matches one of the policy's patterns (RFC 8461 4.1)."""
        return any(mx_matches(p, host) for p in self.mx)


@dataclass(frozen=True)
class Found:
    """The outcome of a policy lookup: the policy in force (if any), and the
    discovery failure to report (if any), as (TLS-RPT result type, text)."""

    policy: Policy | None = None
    failure: tuple[str, str] | None = None


# --- parsing (pure) ---------------------------------------------------------


def txt_id(records: Sequence[str]) -> str | None:
    """The policy id from the `_mta-sts` TXT records, or None: RFC 8461 3.1 keeps the
    records that begin with "v=STSv1;", and anything but exactly one valid record means
    no policy is announced."""
    ours = [r for r in records if r.startswith("v=STSv1;") or r == "v=STSv1"]
    if len(ours) != 1:
        return None
    fields: dict[str, str] = {}
    for part in ours[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if part.strip() and not sep:
            return None
        fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def valid_pattern(pattern: str) -> bool:
    """A host name, or "*." and a host name: no wildcard anywhere else (RFC 8461 3.2)."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.rstrip(".").split(".")
    return len(name) <= 253 and len(labels) >= 2 and all(_LABEL.fullmatch(label) for label in labels)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: exact (case-insensitive), or "*.rest" matching one label before rest."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


def parse_policy(text: str, policy_id: str, now: dt.datetime, domain: str = "") -> Policy:
    """The policy file's text; raises PolicyError."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    fields: dict[str, str] = {}
    patterns: list[str] = []
    for line in lines:
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise PolicyError(f"not a 'key: value' line: {line[:80]!r}")
        if key == "mx":
            patterns.append(value)
        else:
            fields.setdefault(key, value)  # RFC 8461 3.2: the first occurrence counts
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version', 'missing')!r}, not STSv1")
    mode = fields.get("mode", "")
    if mode not in (ENFORCE, TESTING, NONE):
        raise PolicyError(f"mode is {mode or 'missing'!r}, not enforce, testing or none")
    age_text = fields.get("max_age", "")
    if not age_text.isdigit():
        raise PolicyError(f"max_age is {age_text or 'missing'!r}, not a number of seconds")
    max_age = min(int(age_text), MAX_AGE_LIMIT)
    good = []
    for pattern in patterns:
        if valid_pattern(pattern):
            good.append(pattern.lower().rstrip("."))
        else:
            log.warning("MTA-STS policy of %s: mx pattern %r is not a host name or *.host name: ignored",
                        domain or "?", pattern)
    if mode != NONE and not good:
        raise PolicyError(f"mode {mode} with no usable mx line")
    return Policy(policy_id, mode, max_age, tuple(good), tuple(lines), now, now + dt.timedelta(seconds=max_age))


# --- the cache and the fetcher ---------------------------------------------


class Policies:
    """The policies in force, looked up per delivery; see the module docstring."""

    def __init__(
        self, *, resolver: PolicyResolver, clock: Clock, cache_file: Path | None, port: int = 443,
        ca_file: str = "", timeout: float = 30.0, max_size: int = 64 * 1024,
    ) -> None:
        self.resolver = resolver
        self.clock = clock
        self.cache_file = cache_file
        self.port = port
        self.timeout = timeout
        self.max_size = max_size
        self.ca_file = ca_file
        self.cached: dict[str, Policy] = self._load()
        self.fetching: dict[str, asyncio.Task[Found]] = {}
        self.refreshing: set[asyncio.Task[Found]] = set()
        self.fetches = 0  # policy files requested so far (logs, tests)

    @functools.cached_property
    def context(self) -> ssl.SSLContext:
        """HTTPS with the policy host's certificate verified; made at first use (see Planner.verified)."""
        return ssl.create_default_context(cafile=self.ca_file or None)

    async def find(self, domain: str) -> Found:
        """The policy in force for mail to `domain`, fetching it when it is new or changed."""
        domain = domain.lower()
        now = self.clock.now()
        cached = self.cached.get(domain)
        if cached is not None and cached.expires <= now:
            cached = None
        try:
            announced = txt_id(await self.resolver.txt(f"_mta-sts.{domain}"))
        except LookupFailed as exc:
            log.info("MTA-STS: the TXT lookup for %s failed (%s)%s", domain, exc,
                     "; the cached policy stays in force" if cached else "")
            return Found(cached)
        if announced is None:
            return Found(cached)  # none announced: a cached policy still holds until it expires
        if cached is not None and cached.id == announced:
            if (now - cached.fetched).total_seconds() >= min(REFRESH_AFTER, cached.max_age / 2):
                self._refresh(domain, announced)
            return Found(cached)
        found = await self._fetch_once(domain, announced)
        if found.policy is None and cached is not None:
            log.warning("MTA-STS: keeping the cached policy of %s (id %s) until it expires at %s",
                        domain, cached.id, cached.expires.isoformat(timespec="seconds"))
            return Found(cached, found.failure)
        return found

    def _refresh(self, domain: str, announced: str) -> None:
        if domain in self.fetching:
            return
        task = asyncio.get_running_loop().create_task(self._fetch_once(domain, announced))
        self.refreshing.add(task)
        task.add_done_callback(self.refreshing.discard)

    async def _fetch_once(self, domain: str, announced: str) -> Found:
        """One fetch per domain at a time: deliveries arriving meanwhile wait for its result."""
        task = self.fetching.get(domain)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(domain, announced))
            self.fetching[domain] = task
            task.add_done_callback(lambda _: self.fetching.pop(domain, None))
        return await asyncio.shield(task)

    async def _fetch(self, domain: str, announced: str) -> Found:
        host = f"mta-sts.{domain}"
        self.fetches += 1
        try:
            text = await self._get(host)
            policy = parse_policy(text, announced, self.clock.now(), domain)
        except PolicyError as exc:
            log.warning("MTA-STS: policy of %s (https://%s%s) not used: %s", domain, host, PATH, exc)
            return Found(failure=(exc.result, str(exc)))
        log.info("MTA-STS: policy of %s (id %s): mode %s, mx %s, max_age %d", domain, policy.id, policy.mode,
                 ", ".join(policy.mx) or "-", policy.max_age)
        self.cached[domain] = policy
        await asyncio.to_thread(self._save, self._snapshot())
        return Found(policy)

    async def _get(self, host: str) -> str:
        addresses: list[str] = []
        try:
            for rdtype in ("A", "AAAA"):
                addresses += (await self.resolver.lookup(host, rdtype)).records
        except LookupFailed as exc:
            raise PolicyError(f"cannot find the address of {host}: {exc}", FETCH_ERROR) from exc
        if not addresses:
            raise PolicyError(f"{host} has no address", FETCH_ERROR)
        try:
            response = await webfetch.request(
                addresses[0], self.port, host, PATH, context=self.context, timeout=self.timeout,
                max_size=self.max_size,
            )
        except webfetch.CertificateError as exc:
            raise PolicyError(str(exc), WEBPKI_INVALID) from exc
        except webfetch.FetchError as exc:
            raise PolicyError(str(exc), FETCH_ERROR) from exc
        if response.status != 200:
            raise PolicyError(f"https://{host}{PATH} answered {response.status}", FETCH_ERROR)
        if response.media_type != "text/plain":
            raise PolicyError(f"https://{host}{PATH} is {response.media_type or 'untyped'}, not text/plain")
        try:
            return response.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"https://{host}{PATH} is not UTF-8 text") from exc

    # The file: {"domain": {"id", "mode", "max_age", "mx", "lines", "fetched", "expires"}}.

    def _load(self) -> dict[str, Policy]:
        if self.cache_file is None:
            return {}
        try:
            raw = json.loads(self.cache_file.read_text())
            return {
                d: Policy(p["id"], p["mode"], int(p["max_age"]), tuple(p["mx"]), tuple(p["lines"]),
                          dt.datetime.fromisoformat(p["fetched"]), dt.datetime.fromisoformat(p["expires"]))
                for d, p in raw.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("MTA-STS: cache %s unreadable (%s): starting empty", self.cache_file, exc)
            return {}

    def _snapshot(self) -> dict[str, object]:
        return {
            d: {"id": p.id, "mode": p.mode, "max_age": p.max_age, "mx": list(p.mx), "lines": list(p.lines),
                "fetched": p.fetched.isoformat(), "expires": p.expires.isoformat()}
            for d, p in self.cached.items()
        }

    def _save(self, data: dict[str, object]) -> None:
        """Write the cache (in a thread: `data` is a snapshot the event loop no longer changes)."""
        if self.cache_file is None:
            return
        tmp = self.cache_file.with_name(f".{self.cache_file.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.cache_file)  # a reader (or a crash) never sees half a file
        except OSError as exc:
            # The policies still hold in memory; only a restart would forget them.
            log.warning("MTA-STS: cannot write the cache %s (%s): policies are kept in memory only",
                        self.cache_file, exc)

    async def close(self) -> None:
        for task in [*self.fetching.values(), *self.refreshing]:
            task.cancel()
        for task in [*self.fetching.values(), *self.refreshing]:
            with contextlib.suppress(BaseException):
                await task

