"""`mailroom dmarc report`: send the DMARC aggregate reports of the UTC days that have ended.

The MTA records the DMARC verdict of each message from the Internet whose
From: domain publishes a record (mta/auth/dmarcreport.py).  This command, run daily
by the `schedule` program at `[dmarc] report_at`, makes one report per domain
and day and queues it, DKIM-signed like all our mail, to each `rua=mailto:`
address of the domain's record: unless the address is in another organization
that has not agreed to take the domain's reports (RFC 7489 7.1: TXT
`DOMAIN._report._dmarc.ADDRESS-DOMAIN`), or the report is larger than the
address's limit (`!10m`).  The day's verdicts are then dropped; a DNS failure
keeps them for the next run, and verdicts older than a week are dropped anyway.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections import defaultdict

from sqlalchemy import delete, select

from cli.show import clean
from common.config import Config
from common.db import Database
from common.events import Hop
from common.log import new_trace_id
from common.models import DMARCVerdict, utcnow
from mta import queue, resubmit, wakeup
from mta.auth import dmarcreport
from mta.auth.authdns import DNSTempError, Resolver, SyncResolver, txt
from mta.auth.dmarc import org_domain

KEEP = dt.timedelta(days=7)


def run(args: argparse.Namespace, cfg: Config, db: Database, resolver: Resolver | None = None) -> int:
    before = dt.date.fromisoformat(args.before) if args.before else utcnow().date()
    lines = report(cfg, db, resolver or SyncResolver(cfg.dns.nameservers, cfg.dns.timeout),
                   before=before, dry_run=args.dry_run)
    print("\n".join(lines) if lines else "no DMARC verdicts to report")
    return 0


def authorized(domain: str, address: str, resolver: Resolver) -> bool:
    """May we send `domain`'s reports to `address` (RFC 7489 7.1)?  DNSTempError when DNS cannot say."""
    target = address.rsplit("@", 1)[1].lower()
    if org_domain(target) == org_domain(domain):
        return True
    return any(t.lower().replace(b" ", b"").startswith(b"v=dmarc1") for t in
               txt(resolver, f"{domain}._report._dmarc.{target}"))


def report(cfg: Config, db: Database, resolver: Resolver, *, before: dt.date, dry_run: bool = False) -> list[str]:
    cutoff = dt.datetime.combine(before, dt.time())
    sender = cfg.dmarc.report_from or f"postmaster@{cfg.mailroom.domains[0]}"
    org_name = cfg.dmarc.org_name or cfg.mailroom.hostname
    lines: list[str] = []
    with db.read() as s:
        verdicts = list(s.scalars(select(DMARCVerdict).where(DMARCVerdict.time < cutoff).order_by(DMARCVerdict.id)))
    groups: dict[tuple[str, dt.date], list[DMARCVerdict]] = defaultdict(list)
    for v in verdicts:
        groups[(v.policy_domain, v.time.date())].append(v)
    done: list[int] = []
    queued = 0
    for (domain, day), rows in sorted(groups.items()):
        begin = dt.datetime.combine(day, dt.time(), dt.UTC)
        end = begin + dt.timedelta(days=1)
        tags = dmarcreport.parse_record(rows[-1].record)
        report_id = f"{day:%Y%m%d}.{domain}@{cfg.mailroom.hostname}"
        xml = dmarcreport.feedback_xml(org_name=org_name, email_address=sender, report_id=report_id, begin=begin,
                                       end=end, domain=domain, tags=tags, verdicts=rows)
        retry = False
        targets = dmarcreport.destinations(tags)
        if not targets:
            lines.append(f"{clean(domain)} {day}: {len(rows)} message(s); its record asks for no reports")
        for dest in targets:
            shown = f"{clean(domain)} {day}: to {clean(dest.address)}"
            try:
                allowed = authorized(domain, dest.address, resolver)
            except DNSTempError as exc:
                lines.append(f"{shown}: not sent now ({exc}); tried again at the next run")
                retry = True
                continue
            if not allowed:
                lines.append(f"{shown}: not sent: that domain has not agreed to take reports for {clean(domain)} "
                             "(RFC 7489 7.1)")
                continue
            message = dmarcreport.report_message(
                sender=sender, to=dest.address, org_name=org_name, receiver=cfg.mailroom.hostname, domain=domain,
                report_id=report_id, begin=begin, end=end, xml=xml, hostname=cfg.mailroom.hostname, now=utcnow())
            limit = min(dest.limit or dmarcreport.MAX_REPORT, dmarcreport.MAX_REPORT)
            if len(message) > limit:
                lines.append(f"{shown}: not sent: {len(message)} bytes, over its limit of {limit}")
                continue
            if dry_run:
                lines.append(f"{shown}: would send {len(rows)} message(s) in {len(message)} bytes")
                continue
            trace = _queue(cfg, db, sender, dest.address, message)
            if trace is None:
                lines.append(f"{shown}: not sent: no such address here")
                continue
            queued += 1
            lines.append(f"{shown}: {len(rows)} message(s) reported in {len(message)} bytes, queued as {trace}")
        if not retry:
            done += [v.id for v in rows]
    if not dry_run:
        with db.write() as s:
            if done:
                s.execute(delete(DMARCVerdict).where(DMARCVerdict.id.in_(done)))
            s.execute(delete(DMARCVerdict).where(DMARCVerdict.time < cutoff - KEEP))
            s.commit()
        if queued:
            wakeup.send(cfg.qmgr_socket)
    return lines


def _queue(cfg: Config, db: Database, sender: str, to: str, message: bytes) -> str | None:
    """Into the queue as our own mail, DKIM-signed by the sender's domain (when it has keys), to
    what `to` delivers to (its aliases expanded, as the MTA does at RCPT); None when nobody is there."""
    from mta import aliases
    from mta.auth import dkim

    signature = b""
    if cfg.dkim.sign:
        signature = dkim.Signer(cfg.resolve(cfg.dkim.key_dir), cfg.dkim.selectors).sign(
            message, sender.rsplit("@", 1)[1])
    body = signature + message
    trace = new_trace_id()
    with db.write() as s:
        if cfg.is_local_domain(to.rsplit("@", 1)[1]):
            found = aliases.expand(s, to.lower(), local_domains=cfg.mailroom.domains,
                                   delimiter=cfg.mda.recipient_delimiter)
            if found is None:
                return None
            targets = [*found.local, *found.remote]
        else:
            targets = [to]
        queue.enqueue(s, trace=trace, sender=sender, body=body, now=utcnow(), hop=Hop.QMGR,
                      recipients=[queue.QueuedRecipient(t, to) for t in targets], digest=resubmit.digest(body))
        s.commit()
    return trace
