"""The DNS lookups of sender authentication, through the configured nameservers.

The checks (pyspf, dkimpy, our DMARC code) are synchronous libraries; they run
in a worker thread and ask a `Resolver` here, so every lookup goes to
`[dns] nameservers` and unit tests can hand in answers from a dictionary
(tests/harness/dns.py) instead.  An answer is a list of values: TXT as bytes
(strings joined), A/AAAA and PTR as text, MX as (preference, exchange).  No
such name or no such record is an empty list; a failure to learn the answer
(timeout, SERVFAIL) raises `DNSTempError`, which the checks record as
`temperror`, never as a pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from common.config import parse_hostport


class DNSTempError(Exception):
    """The answer could not be had now; asking again later may work."""


class Resolver(Protocol):
    def query(self, name: str, rdtype: str) -> list[Any]: ...


class SyncResolver:
    """A blocking dnspython resolver for worker threads."""

    def __init__(self, nameservers: Sequence[str], timeout: float) -> None:
        if nameservers:
            self._r = dns.resolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for ns in nameservers:
                host, port = parse_hostport(ns, 53)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            self._r.nameservers = servers
        else:
            self._r = dns.resolver.Resolver()
        self._r.lifetime = timeout

    def query(self, name: str, rdtype: str) -> list[Any]:
        try:
            answer = self._r.resolve(name.rstrip(".") + ".", rdtype, search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
            raise DNSTempError(f"{name} {rdtype}: {exc.__class__.__name__}") from None
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"{name} {rdtype}: {exc}") from None
        return [_value(rdtype, rd) for rd in answer]


def _value(rdtype: str, rd: Any) -> Any:
    if rdtype == "TXT":
        return b"".join(rd.strings)
    if rdtype in ("A", "AAAA"):
        return str(rd.address)
    if rdtype == "MX":
        return (int(rd.preference), rd.exchange.to_text(omit_final_dot=True))
    if rdtype in ("PTR", "CNAME"):
        return rd.target.to_text(omit_final_dot=True)
    return rd.to_text()


def txt(resolver: Resolver, name: str) -> list[bytes]:
    return [bytes(v) for v in resolver.query(name, "TXT")]
