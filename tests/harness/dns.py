"""DNS answers from a dictionary, for unit tests: `FakeResolver`.

It takes the same records as the real DNS server of tests/support/dns_server.py
(so a table can serve both, and test_routing runs each test against both) and
answers through the one resolver interface every component is given:

- `await lookup(name, rdtype)` as `common.dns.Resolver`: a `common.dns.Answer`
  of dnspython records (nxdomain for no such name, no records for no such
  record), `DNSTempError` for SERVFAIL/REFUSED and TIMEOUT (timeout=True);
- `query(name, rdtype)` for the blocking face of one-shot commands
  (mta/authdns.py, `mailroom dns --check`): plain values, [] for no such name
  or record, DNSTempError for a failure.

As the real server does, it follows a CNAME and answers NODATA (not NXDOMAIN)
for a name that exists only as the parent of listed names.  One convenience the
server lacks: a TXT value not in zone-file quotes is one string, split into
255-octet pieces as a DKIM key needs (the server reads zone-file text).
The other end of the wire, the real server, stays for interop and end-to-end tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from common.dns import Answer, DNSTempError
from mta.authdns import _value
from tests.support.dns_server import normalize_records


def _quoted(value: str) -> str:
    if value.startswith('"'):
        return value
    raw = value.encode()
    pieces = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join('"' + p.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for p in pieces)


class FakeResolver:
    """Records as for DNSServer: {name: {"MX": [(10, "mx.test")], "A": [...], ...} or a mode
    ("SERVFAIL", "REFUSED", "NXDOMAIN", "TIMEOUT")}."""

    def __init__(self, records: Mapping[str, Mapping[str, Any] | str], *, ttl: float = 60.0) -> None:
        fixed: dict[str, Mapping[str, Any] | str] = {}
        for name, spec in records.items():
            if isinstance(spec, Mapping) and "TXT" in spec:
                values = spec["TXT"]
                values = [values] if isinstance(values, str) else values
                spec = {**spec, "TXT": [_quoted(v) for v in values]}
            fixed[name] = spec
        self.records = normalize_records(fixed)
        self.ttl = ttl
        self.asked: list[tuple[str, str]] = []

    def queries(self) -> list[tuple[str, str]]:
        """The (name, type) pairs asked so far, as DNSServer.queries() gives them."""
        return list(self.asked)

    def clear_queries(self) -> None:
        self.asked.clear()

    def _answer(self, name: str, rdtype: str, depth: int = 0) -> list[dns.rdata.Rdata]:
        """The records, or dnspython's exception for what a real server would say."""
        key = dns.name.from_text(name, origin=dns.name.root).to_text().lower()
        if depth == 0:
            self.asked.append((key.rstrip("."), rdtype.upper()))
        spec = self.records.get(key)
        if spec is None:
            if any(k.endswith("." + key) for k in self.records):
                return []  # an empty non-terminal: NODATA (RFC 8020)
            raise dns.resolver.NXDOMAIN
        if spec == "NXDOMAIN":
            raise dns.resolver.NXDOMAIN
        if spec == "TIMEOUT":
            raise dns.exception.Timeout
        if isinstance(spec, str):  # SERVFAIL, REFUSED: no server would answer
            raise dns.resolver.NoNameservers
        wanted = rdtype.upper()
        if "CNAME" in spec and wanted != "CNAME" and depth < 8:
            return self._answer(spec["CNAME"][0], rdtype, depth + 1)
        kind = dns.rdatatype.from_text(wanted)
        return [
            dns.rdata.from_text(dns.rdataclass.IN, kind, text, origin=dns.name.root, relativize=False)
            for text in spec.get(wanted, [])
        ]

    # --- common.dns.Resolver -------------------------------------------------------------

    async def lookup(self, name: str, rdtype: str) -> Answer:
        try:
            records = self._answer(name, rdtype)
        except dns.resolver.NXDOMAIN:
            return Answer(name, rdtype, nxdomain=True, ttl=self.ttl)
        except dns.exception.Timeout:
            raise DNSTempError(f"{name} {rdtype}: no answer", timeout=True) from None
        except dns.resolver.NoNameservers:
            raise DNSTempError(f"{name} {rdtype}: SERVFAIL") from None
        return Answer(name, rdtype, tuple(records), ttl=self.ttl)

    # --- the blocking face of one-shot commands (mta/authdns.py) -----------------------------

    def query(self, name: str, rdtype: str) -> list[Any]:
        try:
            answer = self._answer(name, rdtype)
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DNSTempError(f"{name} {rdtype}: {type(exc).__name__}") from None
        return [_value(rdtype.upper(), rd) for rd in answer]
