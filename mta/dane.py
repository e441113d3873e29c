"""DANE for SMTP (RFC 7672): which TLSA records an MX host has, and whether a server's certificates match them.

The order of questions is RFC 7672's (section 2.2), each asked of a
validating resolver that this process trusts (mta/tlsdns.py):

1. Is the domain's MX RRset validated (or, with no MX, its own address
   records, 2.2.2)?  If not, DANE does not apply to the domain: an attacker
   who can forge the MX can name any host, so TLSA records of hosts found
   that way prove nothing (the opportunistic choice of Postfix and of the
   RFC's author; RFC 7672 2.2.1 allows either).
2. Are the MX host's address records validated?  If not, no TLSA lookup
   (2.2.2: an unsigned zone's servers often answer unknown types badly).
3. TLSA at `_25._tcp.<MX host>`, validated:
   - usable records: the server's certificate must match one (below), or
     that host is not used;
   - records, none usable: TLS is still required, without authentication
     (RFC 7672 2.2: "mandatory unauthenticated TLS");
   - validated denial (NXDOMAIN, NODATA), or an answer not validated: no DANE
     for that host;
   - a lookup that fails (SERVFAIL, which is also what a validating resolver
     answers for a bad signature, or a timeout): the host is not used this
     time (2.2: a failed lookup is never taken for "no records").
   Always port 25 in the name: `[mta] remote_port` only moves the lab's MX
   hosts off the privileged port; the records describe SMTP on 25.

Usable (RFC 7672 3.1): usage DANE-EE(3) or DANE-TA(2), selector full
certificate(0) or SubjectPublicKeyInfo(1), matching full(0), SHA-256(1) or
SHA-512(2), with data of the right length (32 and 64 octets for the digests;
a DER certificate or key for "full").  PKIX-TA(0) and PKIX-EE(1) are not
used for SMTP (3.1.3), and anything unknown is unusable, never an error.

Matching (RFC 7672 3.1, 3.2):
- DANE-EE(3): the server's own certificate (or its key) is the one named.
  Names and validity dates are not checked: the DNS record is the authority.
- DANE-TA(2): a certificate the server sent in its chain is the trust anchor;
  the server's certificate must chain to it (signatures and validity dates),
  and name the MX host (or the recipient domain), wildcards as RFC 6125 allows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from mta.tlsdns import LookupFailed, PolicyResolver

log = logging.getLogger("dane")

PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
CERT, SPKI = 0, 1
FULL, SHA256, SHA512 = 0, 1, 2
_DIGEST_SIZE = {SHA256: 32, SHA512: 64}

# What the host's records decided (`HostTLSA.state`).
DANE = "dane"  # usable records: the certificate must match one
UNUSABLE = "unusable"  # records, none usable: TLS required, not authenticated
NO_DANE = "none"  # DANE does not apply to this host
FAILED = "failed"  # the lookup failed: do not use this host now


@dataclass(frozen=True)
class TLSA:
    usage: int
    selector: int
    matching: int
    data: bytes

    @classmethod
    def parse(cls, text: str) -> TLSA:
        """'3 1 1 AB12...' (zone-file text); ValueError when it is not TLSA at all."""
        parts = text.split()
        if len(parts) < 4:
            raise ValueError(f"not a TLSA record: {text!r}")
        usage, selector, matching = (int(p) for p in parts[:3])
        return cls(usage, selector, matching, bytes.fromhex("".join(parts[3:])))

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"

    def unusable(self) -> str:
        """Why this record cannot be used for SMTP ("" when it can)."""
        if self.usage not in (DANE_TA, DANE_EE):
            return f"usage {self.usage} ({'PKIX, not for SMTP' if self.usage in (PKIX_TA, PKIX_EE) else 'unknown'})"
        if self.selector not in (CERT, SPKI):
            return f"unknown selector {self.selector}"
        if self.matching not in (FULL, SHA256, SHA512):
            return f"unknown matching type {self.matching}"
        size = _DIGEST_SIZE.get(self.matching)
        if size is not None and len(self.data) != size:
            return f"{len(self.data)} octets where the digest has {size}"
        if self.matching == FULL:
            try:
                if self.selector == CERT:
                    x509.load_der_x509_certificate(self.data)
                else:
                    serialization.load_der_public_key(self.data)
            except ValueError:
                return "full data that is not a DER " + ("certificate" if self.selector == CERT else "public key")
        return ""

    def matches(self, cert_der: bytes) -> bool:
        """Whether this record names that certificate (or its key)."""
        if self.selector == CERT:
            content = cert_der
        else:
            content = x509.load_der_x509_certificate(cert_der).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        if self.matching == SHA256:
            content = hashlib.sha256(content).digest()
        elif self.matching == SHA512:
            content = hashlib.sha512(content).digest()
        return content == self.data


@dataclass(frozen=True)
class HostTLSA:
    """What DNS says about one MX host's TLS (see the module docstring for `state`)."""

    state: str
    usable: tuple[TLSA, ...] = ()
    records: tuple[str, ...] = ()  # every record as published, usable or not (logs, TLS-RPT)
    reason: str = ""


@dataclass
class Discovery:
    """DANE for one destination: per MX host name; `secure`: the MX RRset was validated."""

    secure: bool
    hosts: dict[str, HostTLSA] = field(default_factory=dict)
    failed: str = ""  # the MX lookup itself failed: no host may be used now

    def host(self, name: str) -> HostTLSA:
        if self.failed:
            return HostTLSA(FAILED, reason=self.failed)
        return self.hosts.get(name.lower(), HostTLSA(NO_DANE, reason="the MX records are not DNSSEC-validated"))


def split_records(texts: Sequence[str]) -> tuple[list[TLSA], list[str]]:
    """(usable records, one line per unusable record saying why)."""
    usable: list[TLSA] = []
    bad: list[str] = []
    for text in texts:
        try:
            record = TLSA.parse(text)
        except ValueError as exc:
            bad.append(f"{text}: {exc}")
            continue
        why = record.unusable()
        if why:
            bad.append(f"{text}: {why}")
        else:
            usable.append(record)
    return usable, bad


async def discover(resolver: PolicyResolver, domain: str, names: Sequence[str]) -> Discovery:
    """DANE for mail to `domain` whose route chose the MX host `names` (the
    domain itself for an implicit MX)."""
    if not resolver.trusted:
        return Discovery(secure=False)
    try:
        mx = await resolver.lookup(domain, "MX")
    except LookupFailed as exc:
        log.warning("DANE: the MX lookup for %s failed (%s): no host is used until it answers", domain, exc)
        return Discovery(secure=False, failed=f"DNSSEC lookup of the MX of {domain} failed: {exc}")
    if not mx.validated:
        return Discovery(secure=False)
    allowed = {r.split()[-1].rstrip(".").lower() for r in mx.records} if mx.records else {domain.lower()}
    found = Discovery(secure=True)
    for name in dict.fromkeys(n.lower() for n in names):
        if name not in allowed:
            # Our routing resolver named a host that the validated MX RRset does not.
            why = f"{name} is not among the DNSSEC-validated MX hosts of {domain}"
            found.hosts[name] = HostTLSA(FAILED, reason=why)
            continue
        found.hosts[name] = await _host(resolver, name)
    return found


async def _host(resolver: PolicyResolver, name: str) -> HostTLSA:
    try:
        addresses = await resolver.lookup(name, "A")
        if addresses.exists and not addresses.records:
            addresses = await resolver.lookup(name, "AAAA")
    except LookupFailed as exc:
        return HostTLSA(FAILED, reason=f"DNSSEC lookup of the address of {name} failed: {exc}")
    if not addresses.validated:
        return HostTLSA(NO_DANE, reason=f"the address records of {name} are not DNSSEC-validated")
    qname = f"_25._tcp.{name}"
    try:
        answer = await resolver.tlsa(qname)
    except LookupFailed as exc:
        return HostTLSA(FAILED, reason=f"the TLSA lookup at {qname} failed: {exc}")
    if not answer.validated:
        return HostTLSA(NO_DANE, reason=f"the TLSA answer at {qname} is not DNSSEC-validated")
    if not answer.records and not answer.malformed:
        return HostTLSA(NO_DANE, reason=f"no TLSA records at {qname}")
    usable, bad = split_records(answer.records)
    for line in (*bad, *(f"malformed: {m}" for m in answer.malformed)):
        log.warning("DANE: unusable TLSA record at %s: %s", qname, line)
    if not usable:
        return HostTLSA(UNUSABLE, (), tuple(answer.records),
                        reason=f"every TLSA record at {qname} is unusable: TLS required, without authentication")
    return HostTLSA(DANE, tuple(usable), tuple(answer.records))


def check_chain(records: Sequence[TLSA], chain: Sequence[bytes], names: Sequence[str], now: dt.datetime) -> str:
    """"" when the server's chain (its certificate first, DER) matches one usable
    record; else why not, for the log and the deferral."""
    if not chain:
        return "the server sent no certificate"
    if any(r.usage == DANE_EE and r.matches(chain[0]) for r in records):
        return ""
    anchors = [cert for cert in chain[1:] if any(r.usage == DANE_TA and r.matches(cert) for r in records)]
    if not anchors:
        kinds = "DANE-EE or DANE-TA" if any(r.usage == DANE_TA for r in records) else "DANE-EE"
        return f"no certificate the server sent matches its {kinds} TLSA records"
    leaf = x509.load_der_x509_certificate(chain[0])
    intermediates = [x509.load_der_x509_certificate(c) for c in chain[1:]]
    problem = ""
    for anchor in anchors:
        store = verification.Store([x509.load_der_x509_certificate(anchor)])
        for name in names:
            verifier = verification.PolicyBuilder().store(store).time(now).build_server_verifier(
                x509.DNSName(name)
            )
            try:
                verifier.verify(leaf, intermediates)
                return ""
            except verification.VerificationError as exc:
                problem = f"the certificate does not chain to the DANE-TA trust anchor for {name}: {exc}"
            except ValueError as exc:  # a name the verifier cannot take
                problem = str(exc)
    return problem
