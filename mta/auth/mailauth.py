"""MailAuth: sender authentication, signing, SRS and the filter, as the daemons call them.

One object, built in the daemon's wiring (`run` in mta/smtpd.py and
mta/qmgr.py) from values: the DKIM signer, the process's one resolver, the
rspamd client, the SRS codec and the policy (`AuthPolicy`: the settings it
applies), and passed to the listener and the queue manager.  Each method is
one hook, called with one line, so the callers keep their shape and the logic
stays in the modules that own it: dkim.py (signing), checks.py, spf.py and
dmarc.py (the verdicts), dmarcreport.py (each verdict kept for the daily DMARC
reports, in the database it is given), srs.py (sender rewriting),
contentfilter.py (rspamd, DNS blocklists).  The order a message meets them is
in this package's __init__.py.

`mailroom reload` gives a daemon a new config object (common/reload.py), with
new [dkim], [mailauth] and [filter] settings; `Current` builds a new MailAuth
from it at the first hook after, so they hold from the next message on, and
key files replaced in place are read again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common import verdict as spam_verdict
from common.config import Config
from common.reply import Reply
from mta.auth import srs

if TYPE_CHECKING:
    from common.db import Database
    from common.dns import Resolver
    from mta.auth import checks, contentfilter
    from mta.auth import dkim as dkimmod

# checks.py, dkim.py and contentfilter.py bring dkimpy and the public suffix list
# (a third of a second): imported when first needed, so a test that starts a
# listener does not wait for them (the daemons load them before they listen:
# mta/smtpd.py, PRELOAD).

log = logging.getLogger("mailauth")


@dataclass(frozen=True)
class AuthPolicy:
    """The settings sender authentication applies."""

    hostname: str  # ours: the authserv-id of our Authentication-Results
    local_domains: tuple[str, ...]
    forwarder_domain: str  # what we forward as: our SRS addresses and ARC seals
    sign: bool  # DKIM-sign our mail leaving our domains, ARC-seal what we forward
    check: bool  # SPF, DKIM, DMARC and ARC on mail from the Internet
    dmarc_reject: bool  # refuse a DMARC failure whose domain says p=reject
    defer_on_dns_error: bool  # 451 when a DNS failure could change the verdict
    quarantine_header: str  # added to p=quarantine failures ("": none)
    dns_timeout: float  # seconds one check may wait for its lookups
    filter_when_down: str  # accept_unscanned or defer, when rspamd cannot be asked
    dnsbl_zones: tuple[str, ...]  # DNS blocklists asked at connect (none: off)
    dmarc_reports: bool  # keep each DMARC verdict for the daily aggregate reports

    @classmethod
    def from_config(cls, cfg: Config) -> AuthPolicy:
        ma = cfg.mailauth
        return cls(
            hostname=cfg.mailroom.hostname, local_domains=tuple(cfg.mailroom.domains),
            forwarder_domain=ma.srs_domain or cfg.mailroom.domains[0], sign=cfg.dkim.sign, check=ma.check,
            dmarc_reject=ma.dmarc_reject, defer_on_dns_error=ma.dns_error == "defer",
            quarantine_header=ma.quarantine_header, dns_timeout=cfg.dns.timeout,
            filter_when_down=cfg.filter.when_down, dnsbl_zones=tuple(cfg.filter.dnsbl_zones),
            dmarc_reports=cfg.dmarc.reports,
        )


@dataclass
class Inbound:
    """What the checks decided for a message from the Internet."""

    reply: Reply | None  # a refusal, or None to go on
    headers: bytes  # to put on top of the message (Authentication-Results, ...)
    content: bytes  # the message with our own stale Authentication-Results removed


class MailAuth:
    """The hooks of sender authentication, over the values they need."""

    def __init__(
        self, *, policy: AuthPolicy, signer: dkimmod.Signer, resolver: Resolver, srs_codec: srs.SRS,
        content_filter: contentfilter.Rspamd | None = None, db: Database | None = None,
    ) -> None:
        self.policy = policy
        self.signer = signer
        self.resolver = resolver
        self.srs_codec = srs_codec
        self.content_filter = content_filter
        self.db = db  # where DMARC verdicts are kept for the reports (None: nowhere)
        self._keeping: set[asyncio.Task[None]] = set()  # verdicts on their way to the database

    @classmethod
    def from_config(cls, cfg: Config, resolver: Resolver, db: Database | None = None) -> MailAuth:
        """The MailAuth of `cfg`, over the process's resolver and database (what the wiring builds)."""
        from mta.auth import contentfilter
        from mta.auth import dkim as dkimmod

        policy = AuthPolicy.from_config(cfg)
        f = cfg.filter
        return cls(
            policy=policy,
            signer=dkimmod.Signer(cfg.resolve(cfg.dkim.key_dir), cfg.dkim.selectors),
            resolver=resolver,
            srs_codec=srs.SRS(
                srs.load_secret(cfg.run_dir), policy.forwarder_domain, max_age_days=cfg.mailauth.srs_max_age
            ),
            content_filter=contentfilter.Rspamd(f.scanner_address, timeout=f.timeout) if f.scanner_address else None,
            db=db,
        )

    async def check_connect(self, client_ip: str) -> Reply | None:
        """DNS blocklists at connect (off unless [filter] dnsbl_zones lists zones)."""
        p = self.policy
        if not p.dnsbl_zones:
            return None
        from mta.auth import contentfilter

        return await contentfilter.dnsbl_check(client_ip, list(p.dnsbl_zones), self.resolver, timeout=p.dns_timeout)

    def rewrite_recipient(self, recipient: str) -> str | Reply | None:
        """A bounce to one of our SRS addresses: the original sender it goes back to.

        None when `recipient` is no SRS address; a Reply when it is forged or too old.
        """
        local, _, domain = recipient.rpartition("@")
        if not srs.is_srs(local):
            return None
        if domain.lower() != self.srs_codec.domain:
            return None  # someone else's SRS address: an ordinary recipient
        try:
            return self.srs_codec.reverse(recipient)
        except srs.SRSError as exc:
            log.info("refused SRS address <%s>: %s", recipient, exc)
            return srs.FORGED

    async def sign_outgoing(self, content: bytes, *, trusted: bool, recipients: list[str]) -> bytes:
        """DKIM-Signature headers to put on `content` when it is ours and leaves; else b""."""
        from mta.auth import dkim as dkimmod

        p = self.policy
        if not p.sign:
            return b""
        domain = dkimmod.outgoing_domain(
            content, trusted=trusted, recipients=recipients, local_domains=list(p.local_domains)
        )
        if domain is None:
            return b""
        sig = await asyncio.to_thread(self.signer.sign, content, domain)
        if not sig:
            log.warning("no DKIM key for %s: sending unsigned (mailroom dkim keygen %s)", domain, domain)
        return sig

    def _keep_verdict(self, verdict: checks.Verdict, reply_code: int | None) -> None:
        """Write the verdict for the DMARC reports beside the session, not in its way: a
        statistic, written with the next relaxed batch, that no reply waits for (a verdict
        still on its way when the process stops is missing from that day's report)."""
        from mta.auth import dmarcreport

        assert self.db is not None
        if not dmarcreport.wanted(verdict, reply_code):
            return  # no task for a verdict nobody reports
        task = asyncio.ensure_future(dmarcreport.record(
            self.db, verdict, reply_code=reply_code, quarantine_header=self.policy.quarantine_header,
        ))
        self._keeping.add(task)
        task.add_done_callback(self._kept)

    async def kept(self) -> None:
        """Wait (a few seconds at most) for the verdicts still on their way to the database."""
        if self._keeping:
            await asyncio.wait(set(self._keeping), timeout=5.0)

    def _kept(self, task: asyncio.Task[None]) -> None:
        self._keeping.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("could not keep a DMARC verdict for the reports: %s", task.exception())

    async def check_inbound(
        self, content: bytes, *, client_ip: str, helo: str, mail_from: str,
        recipients: list[str], trace: str, deliver_to: list[str] | None = None,
    ) -> Inbound:
        """SPF, DKIM, DMARC and ARC for public mail, then the content filter.

        `deliver_to` (the recipients after alias expansion): when some are outside
        addresses the message is forwarded, and gets our ARC seal over our results.
        """
        from mta.auth import checks, contentfilter

        p = self.policy
        headers = b""
        content = checks.strip_own_results(content, p.hostname)
        if p.quarantine_header:
            content = checks.strip_header(content, p.quarantine_header)
        if p.check:
            # On this event loop: the lookups are awaited, not waited for in a thread;
            # each check has [dns] timeout for them, then it is a temperror.
            verdict = await checks.evaluate(
                content, client_ip=client_ip, helo=helo, mail_from=mail_from,
                hostname=p.hostname, resolver=self.resolver, timeout=p.dns_timeout,
            )
            decision = checks.decide(
                verdict, dmarc_reject=p.dmarc_reject, defer_on_dns_error=p.defer_on_dns_error,
                quarantine_header=p.quarantine_header,
            )
            log.info("auth %s", verdict.summary())
            if p.dmarc_reports and self.db is not None:  # kept for the daily DMARC aggregate reports
                self._keep_verdict(verdict, decision.reply.code if decision.reply else None)
            if decision.reply is not None:
                return Inbound(decision.reply, b"", content)
            headers += decision.headers
            if p.sign and any(a.rsplit("@", 1)[-1].lower() not in p.local_domains for a in deliver_to or []):
                sealed = await asyncio.to_thread(
                    self.signer.seal, headers + content, p.forwarder_domain, p.hostname
                )
                headers = sealed + headers
        # Spam verdict fields only ever come from our own filter (the MDA files by them).
        content = spam_verdict.strip(content)
        if self.content_filter is not None:
            scanned = await self.content_filter.scan(
                headers + content, client_ip=client_ip, helo=helo, mail_from=mail_from,
                recipients=recipients, queue_id=trace, hostname=p.hostname,
            )
            verdict_reply, extra = contentfilter.decide(scanned, when_down=p.filter_when_down)
            if verdict_reply is not None:
                return Inbound(verdict_reply, b"", content)
            headers += extra
        return Inbound(None, headers, content)

    def forward_sender(self, sender: str, *, original: str, recipient: str) -> str:
        """The envelope sender for delivering to `recipient`, which `original` forwards to.

        Mail forwarded to an outside address gets an SRS sender in our domain, so
        the receiver's SPF check sees us; anything else keeps its sender.
        """
        local = self.policy.local_domains
        if not sender or "@" not in sender or "@" not in original:
            return sender
        if original.rsplit("@", 1)[1].lower() not in local or recipient.rsplit("@", 1)[1].lower() in local:
            return sender
        if sender.rsplit("@", 1)[1].lower() in local and not srs.is_srs(sender.rsplit("@", 1)[0]):
            return sender  # ours already: SPF passes as it is
        return self.srs_codec.forward(sender)


class Current:
    """The MailAuth of the config in force, for a daemon whose config a reload replaces.

    `config` gives the daemon's config as it is now; the first call after it
    changed (a reload makes a new object, even when nothing in the file
    changed) builds the MailAuth again.
    """

    def __init__(self, config: Callable[[], Config], resolver: Resolver, db: Database | None = None) -> None:
        self.config = config
        self.resolver = resolver
        self.db = db
        self._built: tuple[Config, MailAuth] | None = None

    def __call__(self) -> MailAuth:
        cfg = self.config()
        if self._built is None or self._built[0] is not cfg:
            self._built = (cfg, MailAuth.from_config(cfg, self.resolver, self.db))
        return self._built[1]
