"""DMARC aggregate reports (RFC 7489 7.2): what we record as mail arrives, and the daily XML.

As each message from the Internet is checked (mta/auth/mailauth.py), `record` keeps
its verdict: the client's address, the From: domain, the SPF and DKIM results,
the DMARC result, what we did (the disposition) and the record that applied.
One row, written in a relaxed batch (no fsync: no reply rests on it).

Once a day `mailroom dmarc report` (cli/dmarc.py) sums a UTC day's rows per
domain into the XML of RFC 7489 appendix C (`feedback`), and sends it to each
`rua=mailto:` address the domain's record names, within that address's size
limit (`!10m`), and, when the address is in another organization, only if it
agreed to take reports for the domain (RFC 7489 7.1: a TXT record at
`DOMAIN._report._dmarc.RUA-DOMAIN`).  The functions here build and decide; the
command asks DNS and queues the messages.

`sample` is how `pct` is honoured (RFC 7489 6.6.4): a failing message outside
the sample gets the next milder policy, and its report row says `sampled_out`.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import gzip
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from sqlalchemy import insert as sa_insert

from common.models import DMARCVerdict

if TYPE_CHECKING:
    from common.db import Database
    from mta.auth.checks import Verdict

MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
# A report larger than this is not sent, whatever the address accepts.
MAX_REPORT = 10 * 1024 * 1024
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def sample(policy: str, pct: str, draw: Callable[[int], int] = random.randrange) -> tuple[str, bool]:
    """The policy for a failing message under `pct`: (policy, whether it was sampled out)."""
    try:
        percent = int(pct)
    except ValueError:
        percent = 100  # an invalid pct is ignored (RFC 7489 6.3: the default)
    if percent >= 100 or policy == "none" or draw(100) < max(percent, 0):
        return policy, False
    return MILDER[policy], True


# --- recording ------------------------------------------------------------------------


def verdict_row(verdict: Verdict, *, refused: bool, delivered_as_quarantine: bool, now: dt.datetime) -> dict[str, Any]:
    d = verdict.dmarc
    if refused:
        disposition, reason = "reject", ""
    elif d.result == "fail" and d.policy in ("quarantine", "reject"):
        # A reject we deliver all the same (`[mailauth] dmarc_reject = false`) is our local policy.
        disposition, reason = ("quarantine" if delivered_as_quarantine else "none"), (
            "local_policy" if d.policy == "reject" else "")
    else:
        disposition, reason = "none", ""
    if d.sampled_out:
        reason = "sampled_out"
    record = "; ".join(f"{k}={v}" for k, v in d.tags.items())
    return {
        "time": now, "source_ip": verdict.client_ip, "header_from": d.domain.lower(),
        "envelope_from": verdict.spf.domain if verdict.spf.identity == "mailfrom" else "",
        "spf_domain": verdict.spf.domain, "spf_result": verdict.spf.result,
        "dkim": json.dumps([[r.domain, r.selector, r.result] for r in verdict.dkim]),
        "result": d.result, "disposition": disposition, "reason": reason,
        "policy_domain": d.record_domain, "record": record,
    }


def wanted(verdict: Verdict, reply_code: int | None) -> bool:
    """Is this verdict kept for a report?  Only when the From: domain's DMARC record asks for
    aggregate reports by mail (RFC 7489 7.2: a `rua=mailto:` address), and not for a 4xx (a
    DNS failure: the sender tries again, and the message would be counted at each try)."""
    return bool(verdict.dmarc.domain) and bool(destinations(verdict.dmarc.tags)) and (reply_code or 500) >= 500


async def record(db: Database, verdict: Verdict, *, reply_code: int | None, quarantine_header: str) -> None:
    """Keep a `wanted` verdict for the day's report; `reply_code`: our refusal, if any."""
    from common.models import utcnow

    row = verdict_row(verdict, refused=reply_code is not None, delivered_as_quarantine=bool(quarantine_header),
                      now=utcnow())

    def insert(conn: Any) -> None:
        conn.execute(_INSERT, row)

    await db.write_batched(insert, relaxed=True)


_INSERT = sa_insert(DMARCVerdict)


# --- the report -----------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    address: str
    limit: int  # bytes; 0: no limit of its own


def destinations(tags: dict[str, str]) -> list[Destination]:
    """The mailto: addresses of rua=, each with its size limit (`mailto:a@example.net!10m`)."""
    out = []
    for uri in tags.get("rua", "").split(","):
        uri = uri.strip()
        if not uri.lower().startswith("mailto:"):
            continue  # only mail is a way we send reports
        address, _, size = uri[len("mailto:"):].partition("!")
        m = re.fullmatch(r"(\d+)([kmgt]?)", size.strip().lower()) if size else None
        limit = int(m.group(1)) * _SIZE_UNITS[m.group(2)] if m else 0
        address = address.strip()
        if address.count("@") == 1 and not address.startswith("@") and not address.endswith("@"):
            out.append(Destination(address, limit))
    return out


def parse_record(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            tags[k.strip().lower()] = v.strip()
    return tags


def _aligned(a: str, b: str, mode: str) -> bool:
    from mta.auth.dmarc import org_domain

    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


def _row_key(v: DMARCVerdict, tags: dict[str, str]) -> tuple[str, ...]:
    dkim = json.loads(v.dkim)
    adkim, aspf = tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower()
    dkim_eval = "pass" if any(r == "pass" and _aligned(d, v.header_from, adkim) for d, _, r in dkim) else "fail"
    spf_eval = "pass" if v.spf_result == "pass" and _aligned(v.spf_domain, v.header_from, aspf) else "fail"
    return (v.source_ip, v.disposition, dkim_eval, spf_eval, v.reason, v.header_from, v.envelope_from,
            json.dumps(dkim), v.spf_domain, v.spf_result)


def feedback_xml(*, org_name: str, email_address: str, report_id: str, begin: dt.datetime, end: dt.datetime,
                 domain: str, tags: dict[str, str], verdicts: Iterable[DMARCVerdict]) -> bytes:
    """The aggregate report (RFC 7489 appendix C) for one domain and one period."""
    counted = Counter(_row_key(v, tags) for v in verdicts)
    x = escape
    p = tags.get("p", "none")
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>', "<feedback>", "  <version>1.0</version>",
        "  <report_metadata>", f"    <org_name>{x(org_name)}</org_name>", f"    <email>{x(email_address)}</email>",
        f"    <report_id>{x(report_id)}</report_id>",
        f"    <date_range><begin>{int(begin.timestamp())}</begin><end>{int(end.timestamp()) - 1}</end></date_range>",
        "  </report_metadata>", "  <policy_published>", f"    <domain>{x(domain)}</domain>",
        f"    <adkim>{x(tags.get('adkim', 'r'))}</adkim>", f"    <aspf>{x(tags.get('aspf', 'r'))}</aspf>",
        f"    <p>{x(p)}</p>", f"    <sp>{x(tags.get('sp', p))}</sp>", f"    <pct>{x(tags.get('pct', '100'))}</pct>",
        "  </policy_published>",
    ]
    for key, count in sorted(counted.items()):
        ip, disposition, dkim_eval, spf_eval, reason, header_from, envelope_from, dkim, spf_domain, spf_result = key
        out += ["  <record>", "    <row>", f"      <source_ip>{x(ip)}</source_ip>", f"      <count>{count}</count>",
                "      <policy_evaluated>", f"        <disposition>{x(disposition)}</disposition>",
                f"        <dkim>{dkim_eval}</dkim>", f"        <spf>{spf_eval}</spf>"]
        if reason:
            out.append(f"        <reason><type>{x(reason)}</type></reason>")
        out += ["      </policy_evaluated>", "    </row>", "    <identifiers>",
                f"      <header_from>{x(header_from)}</header_from>"]
        if envelope_from:
            out.append(f"      <envelope_from>{x(envelope_from)}</envelope_from>")
        out += ["    </identifiers>", "    <auth_results>"]
        for d, selector, result in json.loads(dkim):
            out += ["      <dkim>", f"        <domain>{x(d)}</domain>", f"        <selector>{x(selector)}</selector>",
                    f"        <result>{x(result)}</result>", "      </dkim>"]
        out += ["      <spf>", f"        <domain>{x(spf_domain)}</domain>", "        <scope>mfrom</scope>",
                f"        <result>{x(spf_result)}</result>", "      </spf>", "    </auth_results>", "  </record>"]
    out.append("</feedback>")
    return ("\n".join(out) + "\n").encode()


def report_message(*, sender: str, to: str, org_name: str, receiver: str, domain: str, report_id: str,
                   begin: dt.datetime, end: dt.datetime, xml: bytes, hostname: str, now: dt.datetime) -> bytes:
    """The mail carrying the report: gzip'd XML named as RFC 7489 7.2.1.1 asks."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"Report Domain: {domain} Submitter: {org_name} Report-ID: <{report_id}>"
    msg["Date"] = email.utils.format_datetime(now.replace(tzinfo=dt.UTC))
    msg["Message-ID"] = email.utils.make_msgid("dmarc", domain=hostname)
    msg.set_content(f"DMARC aggregate report for {domain}, {begin:%Y-%m-%d} (UTC), from {org_name}.\n")
    name = f"{receiver}!{domain}!{int(begin.timestamp())}!{int(end.timestamp()) - 1}.xml.gz"
    msg.add_attachment(gzip.compress(xml, mtime=0), maintype="application", subtype="gzip", filename=name)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
