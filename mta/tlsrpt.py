"""SMTP TLS Reporting (RFC 8460), the sending side: count every outbound TLS session, report once a day.

Every new SMTP session to a remote MX host is counted, under the policy it
was made under (an MTA-STS policy, DANE TLSA records, or none found), as a
success or as a failure with its RFC 8460 result type (`starttls-not-supported`,
`certificate-host-mismatch`, `certificate-expired`, `certificate-not-trusted`,
`validation-failure`, `tlsa-invalid`, `dnssec-invalid`, `dane-required`,
`sts-policy-fetch-error`, `sts-policy-invalid`, `sts-webpki-invalid`).  The
courier counts in memory (`Recorder`, no database write on the delivery
path); the queue manager writes the counts to the `tls_results` table every
minute and at shutdown, so a kill -9 loses at most a minute of statistics
and never mail.

Once a UTC day has ended, each recipient domain that publishes a reporting
policy (`_smtp._tls.<domain>` TXT: `v=TLSRPTv1; rua=mailto:...,https://...`)
gets that day's report: the RFC's JSON (section 4.4), gzip'd, in a
multipart/report message (section 5.3) queued like any other mail to each
mailto: address, DKIM-signed like our other outgoing mail; and, when
`[outbound_tls] tlsrpt_https` says so, POSTed to each https: address.  The
rows go in the same transaction that queues the reports: a report is never
lost nor sent twice.  A domain without a reporting policy gets nothing and its
rows are dropped; one whose TXT lookup fails is tried again at the next
minute, for a week.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import gzip
import json
import logging
import ssl
import urllib.parse
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from sqlalchemy import Connection, delete, insert, select

from common.clock import Clock
from common.db import Database
from common.events import Hop
from common.log import new_trace_id
from common.models import TLSResult
from mta import queue, webfetch
from mta.tlsdns import LookupFailed, PolicyResolver

log = logging.getLogger("tlsrpt")

# Policy types (RFC 8460 4.4).
STS, TLSA, NO_POLICY = "sts", "tlsa", "no-policy-found"
# Result types (RFC 8460 4.3).
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
HOST_MISMATCH = "certificate-host-mismatch"
EXPIRED = "certificate-expired"
NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"

KEEP_DAYS = 7  # rows of a domain whose reporting policy cannot be looked up are dropped after this
MEDIA_TYPE = "application/tlsrpt+gzip"


@dataclass(frozen=True)
class PolicyRef:
    """The policy a session was made under, as a report names it."""

    type: str
    domain: str
    strings: tuple[str, ...] = ()  # the MTA-STS policy's lines, or the TLSA records
    mx_host: tuple[str, ...] = ()  # the MTA-STS mx patterns, or the MX host of TLSA records


@dataclass(frozen=True)
class _Key:
    day: str
    policy: PolicyRef
    result: str  # "" for a success
    mx: str
    ip: str
    sending_ip: str
    reason: str


class Recorder:
    """Counts of outbound TLS sessions, kept in memory until the queue manager saves them."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: Counter[_Key] = Counter()

    def success(self, policy: PolicyRef, mx: str, ip: str, sending_ip: str = "") -> None:
        self._count(policy, "", mx, ip, sending_ip, "")

    def failure(self, policy: PolicyRef, result: str, mx: str, ip: str = "", sending_ip: str = "",
                reason: str = "") -> None:
        self._count(policy, result, mx, ip, sending_ip, reason[:300])

    def _count(self, policy: PolicyRef, result: str, mx: str, ip: str, sending_ip: str, reason: str) -> None:
        day = self.clock.now().date().isoformat()
        self.pending[_Key(day, policy, result, mx.lower(), ip, sending_ip, reason)] += 1

    def take(self) -> list[dict[str, object]]:
        """The counts so far as table rows, forgetting them."""
        rows = [
            {"day": k.day, "policy_domain": k.policy.domain, "policy_type": k.policy.type,
             "policy_string": json.dumps(list(k.policy.strings)), "mx_host": json.dumps(list(k.policy.mx_host)),
             "result": k.result, "receiving_mx": k.mx, "receiving_ip": k.ip, "sending_ip": k.sending_ip,
             "reason": k.reason, "count": n}
            for k, n in self.pending.items()
        ]
        self.pending.clear()
        return rows


def reporting_addresses(records: Iterable[str]) -> list[str] | None:
    """The rua URIs of a `_smtp._tls` TXT RRset (RFC 8460 3), or None when there is no
    valid reporting policy (none, several, or one without a rua)."""
    ours = [r for r in records if r.startswith("v=TLSRPTv1;") or r == "v=TLSRPTv1"]
    if len(ours) != 1:
        return None
    fields: dict[str, str] = {}
    for part in ours[0].split(";"):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key.strip(), value.strip())
    uris = [u.strip() for u in fields.get("rua", "").split(",") if u.strip()]
    uris = [u for u in uris if u.lower().startswith(("mailto:", "https:"))]
    return uris or None


def mailto_address(uri: str) -> str:
    """'mailto:tls%2Breports@example.net?subject=x' -> 'tls+reports@example.net'."""
    return urllib.parse.unquote(uri[len("mailto:"):].split("?", 1)[0])


def report_json(
    rows: list[dict[str, object]], *, day: str, organization: str, contact: str, report_id: str,
) -> dict[str, object]:
    """The report (RFC 8460 4.4) for one policy domain and one UTC day, from its rows."""
    start = dt.datetime.fromisoformat(day)
    by_policy: dict[tuple[str, str, str], list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        by_policy[(str(row["policy_type"]), str(row["policy_string"]), str(row["mx_host"]))].append(row)
    policies = []
    for (ptype, pstring, mx_host), group in sorted(by_policy.items()):
        ok = sum(int(str(r["count"])) for r in group if not r["result"])
        failed: Counter[tuple[str, str, str, str, str]] = Counter()
        for r in group:
            if r["result"]:
                key = (str(r["result"]), str(r["receiving_mx"]), str(r["receiving_ip"]), str(r["sending_ip"]),
                       str(r["reason"]))
                failed[key] += int(str(r["count"]))
        policy: dict[str, object] = {"policy-type": ptype, "policy-domain": str(group[0]["policy_domain"])}
        strings, hosts = json.loads(pstring), json.loads(mx_host)
        if strings:
            policy["policy-string"] = strings
        if hosts:
            policy["mx-host"] = hosts
        entry: dict[str, object] = {
            "policy": policy,
            "summary": {"total-successful-session-count": ok, "total-failure-session-count": sum(failed.values())},
        }
        if failed:
            details = []
            for (result, mx, ip, sending_ip, reason), n in sorted(failed.items()):
                d: dict[str, object] = {"result-type": result}
                if sending_ip:
                    d["sending-mta-ip"] = sending_ip
                if mx:
                    d["receiving-mx-hostname"] = mx
                if ip:
                    d["receiving-ip"] = ip
                d["failed-session-count"] = n
                if reason:
                    d["failure-reason-code"] = reason
                details.append(d)
            entry["failure-details"] = details
        policies.append(entry)
    end = start + dt.timedelta(days=1) - dt.timedelta(seconds=1)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{start:%Y-%m-%dT%H:%M:%SZ}", "end-datetime": f"{end:%Y-%m-%dT%H:%M:%SZ}"},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def report_message(
    report: dict[str, object], gz: bytes, *, domain: str, submitter: str, sender: str, to: str, now: dt.datetime,
) -> bytes:
    """The report as mail (RFC 8460 5.3): multipart/report; report-type="tlsrpt"."""
    date_range = report["date-range"]
    assert isinstance(date_range, dict)
    begin = int(dt.datetime.fromisoformat(date_range["start-datetime"].rstrip("Z")).replace(tzinfo=dt.UTC).timestamp())
    end = int(dt.datetime.fromisoformat(date_range["end-datetime"].rstrip("Z")).replace(tzinfo=dt.UTC).timestamp())
    report_id = str(report["report-id"])
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = format_datetime(now.replace(tzinfo=dt.UTC))
    msg["Message-ID"] = make_msgid(domain=submitter)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg.set_content(
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for mail to {domain}\n"
        f"from {date_range['start-datetime']} to {date_range['end-datetime']}.\n"
    )
    filename = f"{submitter}!{domain}!{begin}!{end}!{report_id.split('@')[0]}.json.gz"
    msg.add_attachment(gz, maintype="application", subtype="tlsrpt+gzip", filename=filename)
    msg.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"; boundary="'
                       + str(msg.get_boundary()) + '"')
    return msg.as_bytes()


Signer = Callable[[bytes, list[str]], Awaitable[bytes]]


class Reporter:
    """Saves the recorder's counts and sends the daily reports (driven by the queue manager)."""

    def __init__(
        self, *, db: Database, clock: Clock, recorder: Recorder, resolver: PolicyResolver, hostname: str,
        sender: str, organization: str = "", contact: str = "", https: bool = False,
        https_context: ssl.SSLContext | None = None, https_ca_file: str = "", https_port: int = 443,
        sign: Signer | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.db = db
        self.clock = clock
        self.recorder = recorder
        self.resolver = resolver
        self.hostname = hostname
        self.sender = sender
        self.organization = organization or hostname
        self.contact = contact or sender
        self.https = https
        self.https_context = https_context
        self.https_ca_file = https_ca_file
        self.https_port = https_port
        self.sign = sign
        self.timeout = timeout
        self.posted = 0  # reports POSTed (logs, tests)

    async def save(self) -> int:
        """Write the counts so far (not fsync'd: statistics, no promise rests on them)."""
        kept = self.recorder.pending.copy()
        rows = self.recorder.take()
        if rows:
            try:
                await self.db.write_batched(_insert, rows, relaxed=True)
            except BaseException:
                self.recorder.pending.update(kept)  # counted again at the next try, not lost
                raise
        return len(rows)

    async def send_due(self) -> list[str]:
        """Queue the reports of every day that has ended; returns the queued messages' trace ids."""
        await self.save()
        today = self.clock.now().date().isoformat()
        rows = await self.db.run(_rows_before, self.db, today)
        if not rows:
            return []
        by_domain: dict[str, list[dict[str, object]]] = defaultdict(list)
        for row in rows:
            by_domain[str(row["policy_domain"])].append(row)
        queued: list[str] = []
        for domain, domain_rows in sorted(by_domain.items()):
            queued += await self._report_domain(domain, domain_rows, today)
        return queued

    async def _report_domain(self, domain: str, rows: list[dict[str, object]], today: str) -> list[str]:
        try:
            uris = reporting_addresses(await self.resolver.txt(f"_smtp._tls.{domain}"))
        except LookupFailed as exc:
            oldest = min(str(r["day"]) for r in rows)
            if dt.date.fromisoformat(today) - dt.date.fromisoformat(oldest) <= dt.timedelta(days=KEEP_DAYS):
                log.info("TLS-RPT: the reporting policy of %s could not be looked up (%s): trying again later",
                         domain, exc)
                return []
            uris = None
        ids = [int(str(r["id"])) for r in rows]
        if uris is None:
            await self.db.run(_drop, self.db, ids)
            return []
        mails: list[tuple[str, bytes]] = []
        posts: list[tuple[str, bytes]] = []
        by_day: dict[str, list[dict[str, object]]] = defaultdict(list)
        for row in rows:
            by_day[str(row["day"])].append(row)
        now = self.clock.now()
        for day, day_rows in sorted(by_day.items()):
            report_id = f"{day}.{domain}.{uuid.uuid4().hex[:12]}@{self.hostname}"
            report = report_json(day_rows, day=day, organization=self.organization, contact=self.contact,
                                 report_id=report_id)
            gz = gzip.compress(json.dumps(report, indent=1).encode())
            for uri in uris:
                if uri.lower().startswith("mailto:"):
                    to = mailto_address(uri)
                    content = report_message(report, gz, domain=domain, submitter=self.hostname, sender=self.sender,
                                             to=to, now=now)
                    if self.sign is not None:
                        content = await self.sign(content, [to]) + content
                    mails.append((to, content))
                elif self.https:
                    posts.append((uri, gz))
        queued = await self.db.run(_queue_reports, self.db, ids, self.sender, mails, now)
        if queued is None:
            log.info("TLS-RPT: the counts for %s were reported by another queue manager", domain)
            return []
        for (to, _), trace in zip(mails, queued, strict=True):
            log.info("TLS-RPT: report for %s to <%s> queued as %s", domain, to, trace)
        for uri, gz in posts:
            await self._post(uri, gz, domain)
        return queued

    async def _post(self, uri: str, gz: bytes, domain: str) -> None:
        parts = urllib.parse.urlsplit(uri)
        host = parts.hostname or ""
        try:
            addresses = (await self.resolver.lookup(host, "A")).records
            addresses = addresses or (await self.resolver.lookup(host, "AAAA")).records
            if not addresses:
                raise webfetch.FetchError(f"{host} has no address")
            response = await webfetch.request(
                addresses[0], parts.port or self.https_port, host, parts.path or "/",
                context=self.https_context or ssl.create_default_context(cafile=self.https_ca_file or None),
                timeout=self.timeout, max_size=64 * 1024, method="POST", body=gz, content_type=MEDIA_TYPE,
            )
        except (webfetch.FetchError, LookupFailed) as exc:
            log.warning("TLS-RPT: report for %s not POSTed to %s: %s", domain, uri, exc)
            return
        if 200 <= response.status < 300:
            self.posted += 1
            log.info("TLS-RPT: report for %s POSTed to %s (%d)", domain, uri, response.status)
        else:
            log.warning("TLS-RPT: report for %s POSTed to %s: answered %d", domain, uri, response.status)


# --- the table -----------------------------------------------------------------


def _insert(conn: Connection, rows: list[dict[str, object]]) -> None:
    conn.execute(insert(TLSResult), rows)


def _rows_before(db: Database, day: str) -> list[dict[str, object]]:
    with db.read() as s:
        result = s.execute(select(TLSResult.__table__).where(TLSResult.day < day))
        return [dict(row._mapping) for row in result]


def _drop(db: Database, ids: list[int]) -> None:
    with db.write_relaxed() as s:
        s.execute(delete(TLSResult).where(TLSResult.id.in_(ids)))
        s.commit()


def _queue_reports(
    db: Database, ids: list[int], sender: str, mails: list[tuple[str, bytes]], now: dt.datetime,
) -> list[str] | None:
    """Drop the rows and queue the reports in one transaction; None (and nothing done)
    when another process took some of those rows first."""
    with db.write() as s:
        gone = s.execute(delete(TLSResult).where(TLSResult.id.in_(ids)))
        if getattr(gone, "rowcount", len(ids)) != len(ids):
            s.rollback()
            return None
        traces = []
        for to, content in mails:
            trace = new_trace_id()
            queue.enqueue(s, trace=trace, sender=sender, body=content, now=now, hop=Hop.QMGR,
                          recipients=[queue.QueuedRecipient(to, to)],
                          options={"body_type": "7BIT"})
            traces.append(trace)
        s.commit()
        return traces

