"""DMARC (RFC 7489): the From: domain's policy, and whether SPF or DKIM passed for it.

Plain data in, a `DMARCResult` out: the From: domain, the SPF result with the
domain it was for, each DKIM result with its d= domain, and a resolver for the
`_dmarc` record.  Organizational domains come from the public suffix list
(publicsuffixlist ships a copy).  `pct` is honoured: a failing message not in
the sample gets the next milder policy (mta/dmarcreport.py, RFC 7489 6.6.4).
The result keeps the record's tags for the aggregate reports (`rua`,
mta/dmarcreport.py); failure reports (`ruf`) are not sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from publicsuffixlist import PublicSuffixList

from common.dns import DNSTempError, Resolver
from mta.dmarcreport import sample

_psl: PublicSuffixList | None = None


def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 3.2): the public suffix plus one label."""
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()
    domain = domain.lower().rstrip(".")
    return str(_psl.privatesuffix(domain) or domain)


@dataclass(frozen=True)
class DMARCResult:
    result: str  # pass, fail, none, temperror, permerror
    domain: str  # the From: domain
    policy: str = "none"  # the policy that applies: none, quarantine, reject
    tags: dict[str, str] = field(default_factory=dict)  # the record found ({} when none)
    record_domain: str = ""  # where it was found: the From: domain or its organizational domain
    sampled_out: bool = False  # pct left this failing message out: `policy` is the milder one


Record = tuple[dict[str, str] | None, bool]


async def dmarc_record(domain: str, resolver: Resolver) -> Record:
    """The DMARC record for `domain` (RFC 7489 6.6.3): (tags, found at the organizational domain).
    Raises DNSTempError when DNS could not say."""
    for name, at_org in ((domain, False), (org_domain(domain), True)):
        if at_org and name == domain:
            break
        answer = await resolver.lookup(f"_dmarc.{name}", "TXT")
        records = [t for t in answer.texts() if t.lower().startswith(b"v=dmarc1")]
        if len(records) == 1:
            tags: dict[str, str] = {}
            for part in records[0].decode("utf-8", "replace").split(";"):
                k, sep, v = part.partition("=")
                if sep:
                    tags[k.strip().lower()] = v.strip()
            return tags, at_org
    return None, False


def _aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


async def check_dmarc(
    domain: str | None, *, spf: tuple[str, str], dkim: list[tuple[str, str]], resolver: Resolver
) -> DMARCResult:
    """`spf` is (result, domain checked), `dkim` one (result, d=) per signature."""
    if domain is None:
        return verdict(None, None, spf=spf, dkim=dkim)
    try:
        record: Record | None = await dmarc_record(domain, resolver)
    except DNSTempError:
        record = None
    return verdict(domain, record, spf=spf, dkim=dkim)


def verdict(
    domain: str | None, record: Record | None, *, spf: tuple[str, str], dkim: list[tuple[str, str]]
) -> DMARCResult:
    """The result for `domain` given its record (None: DNS could not say) and the other checks'."""
    if domain is None:
        # No single From: address to check: RFC 7489 6.6.1 lets us refuse, we record it.
        return DMARCResult("permerror", "")
    if record is None:
        return DMARCResult("temperror", domain)
    tags, at_org = record
    if tags is None:
        return DMARCResult("none", domain)
    found_at = org_domain(domain) if at_org else domain
    policy = tags.get("p", "none").lower()
    if at_org and "sp" in tags:
        policy = tags["sp"].lower()
    if policy not in ("none", "quarantine", "reject"):
        policy = "none"
    aspf, adkim = tags.get("aspf", "r").lower(), tags.get("adkim", "r").lower()
    # For the null sender SPF's MAIL FROM identity is postmaster@HELO (RFC 7208 2.4),
    # and that is the identity DMARC aligns (RFC 7489 4.1).
    spf_ok = spf[0] == "pass" and _aligned(spf[1], domain, aspf)
    dkim_ok = any(result == "pass" and _aligned(d, domain, adkim) for result, d in dkim)
    if spf_ok or dkim_ok:
        return DMARCResult("pass", domain, policy, tags, found_at)
    # An answer we could not get might have passed: not a failure (RFC 7489 6.6.2).
    if spf[0] == "temperror" or any(result == "temperror" for result, _ in dkim):
        return DMARCResult("temperror", domain, policy, tags, found_at)
    policy, sampled_out = sample(policy, tags.get("pct", "100"))
    return DMARCResult("fail", domain, policy, tags, found_at, sampled_out)
