"""Where the MTA's listeners call sender authentication, signing, SRS and the filter.

Each function here is one hook, called with one line from the listener
(mta/smtpd.py), so the listener keeps its shape and the logic stays in the
modules that own it: mta/dkim.py (signing), mta/checks.py, mta/spf.py and mta/dmarc.py (SPF,
DKIM, DMARC, ARC verdicts), mta/srs.py (sender rewriting) and mta/contentfilter.py
(rspamd, DNS blocklists).  The process-wide state (keys, SRS secret) is built
once per process from the config, on first use; DNS is the process's one
resolver, which the daemon skeleton built (`Settings.resolver()`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from common import verdict as spam_verdict
from common.config import Config
from common.reply import Reply
from mta import srs

if TYPE_CHECKING:
    from common.dns import Resolver
    from mta import contentfilter
    from mta import dkim as dkimmod

# mta.checks, mta.dkim and mta.contentfilter bring dkimpy and the public suffix list
# (a third of a second): imported on first use, so a daemon starts listening as
# fast as before (supervisord and the tests wait for the port).

log = logging.getLogger("mailauth")


class Settings(Protocol):
    """What the hooks are given: the process's configuration and resolver (a daemon's Context)."""

    @property
    def config(self) -> Config: ...

    def resolver(self) -> Resolver: ...


@dataclass
class _State:
    signer: dkimmod.Signer
    srs: srs.SRS | None = None
    filter: contentfilter.Rspamd | None = None


# One config per process (tests make many, one after another): the state of the
# newest, held with its config so that it is never mistaken for another's.
_current: tuple[Config, _State] | None = None


def _state(config: Config) -> _State:
    global _current
    if _current is not None and _current[0] is config:
        return _current[1]
    from mta import contentfilter
    from mta import dkim as dkimmod

    st = _State(signer=dkimmod.Signer(config.resolve(config.dkim.key_dir), config.dkim.selectors))
    if config.filter.scanner_address:
        st.filter = contentfilter.Rspamd(config.filter.scanner_address, timeout=config.filter.timeout)
    _current = (config, st)
    return st


def srs_codec(config: Config) -> srs.SRS:
    st = _state(config)
    if st.srs is None:
        domain = config.mailauth.srs_domain or config.mailroom.domains[0]
        st.srs = srs.SRS(srs.load_secret(config.run_dir), domain, max_age_days=config.mailauth.srs_max_age)
    return st.srs


async def sign_outgoing(ctx: Settings, content: bytes, *, trusted: bool, recipients: list[str]) -> bytes:
    """DKIM-Signature headers to put on `content` when it is ours and leaves; else b""."""
    from mta import dkim as dkimmod

    cfg = ctx.config
    if not cfg.dkim.sign:
        return b""
    domain = dkimmod.outgoing_domain(
        content, trusted=trusted, recipients=recipients, local_domains=cfg.mailroom.domains
    )
    if domain is None:
        return b""
    signer = _state(cfg).signer
    sig = await asyncio.to_thread(signer.sign, content, domain)
    if not sig:
        log.warning("no DKIM key for %s: sending unsigned (mailroom dkim keygen %s)", domain, domain)
    return sig


@dataclass
class Inbound:
    """What the checks decided for a message from the Internet."""

    reply: Reply | None  # a refusal, or None to go on
    headers: bytes  # to put on top of the message (Authentication-Results, ...)
    content: bytes  # the message with our own stale Authentication-Results removed


async def check_inbound(
    ctx: Settings, content: bytes, *, client_ip: str, helo: str, mail_from: str,
    recipients: list[str], trace: str, deliver_to: list[str] | None = None,
) -> Inbound:
    """SPF, DKIM, DMARC and ARC for public mail, then the content filter.

    `deliver_to` (the recipients after alias expansion): when some are outside
    addresses the message is forwarded, and gets our ARC seal over our results.
    """
    from mta import checks, contentfilter

    cfg = ctx.config
    st = _state(cfg)
    headers = b""
    content = checks.strip_own_results(content, cfg.mailroom.hostname)
    if cfg.mailauth.quarantine_header:
        content = checks.strip_header(content, cfg.mailauth.quarantine_header)
    if cfg.mailauth.check:
        # On this event loop: the lookups are awaited, not waited for in a thread;
        # each check has [dns] timeout for them, then it is a temperror.
        verdict = await checks.evaluate(
            content, client_ip=client_ip, helo=helo, mail_from=mail_from,
            hostname=cfg.mailroom.hostname, resolver=ctx.resolver(), timeout=cfg.dns.timeout,
        )
        decision = checks.decide(
            verdict, dmarc_reject=cfg.mailauth.dmarc_reject, defer_on_dns_error=cfg.mailauth.dns_error == "defer",
            quarantine_header=cfg.mailauth.quarantine_header,
        )
        log.info("auth %s", verdict.summary())
        if cfg.dmarc.reports:  # kept for the daily DMARC aggregate reports
            from mta import dmarcreport

            await dmarcreport.record(ctx, verdict, reply_code=decision.reply.code if decision.reply else None,
                                     quarantine_header=cfg.mailauth.quarantine_header)
        if decision.reply is not None:
            return Inbound(decision.reply, b"", content)
        headers += decision.headers
        local = cfg.mailroom.domains
        if cfg.dkim.sign and any(a.rsplit("@", 1)[-1].lower() not in local for a in deliver_to or []):
            seal_domain = cfg.mailauth.srs_domain or local[0]
            sealed = await asyncio.to_thread(st.signer.seal, headers + content, seal_domain, cfg.mailroom.hostname)
            headers = sealed + headers
    # Spam verdict fields only ever come from our own filter (the MDA files by them).
    content = spam_verdict.strip(content)
    if st.filter is not None:
        scanned = await st.filter.scan(
            headers + content, client_ip=client_ip, helo=helo, mail_from=mail_from,
            recipients=recipients, queue_id=trace, hostname=cfg.mailroom.hostname,
        )
        verdict_reply, extra = contentfilter.decide(scanned, when_down=cfg.filter.when_down)
        if verdict_reply is not None:
            return Inbound(verdict_reply, b"", content)
        headers += extra
    return Inbound(None, headers, content)


async def check_connect(ctx: Settings, client_ip: str) -> Reply | None:
    """DNS blocklists at connect (off unless [filter] dnsbl_zones lists zones)."""
    cfg = ctx.config
    if not cfg.filter.dnsbl_zones:
        return None
    from mta import contentfilter

    return await contentfilter.dnsbl_check(
        client_ip, cfg.filter.dnsbl_zones, ctx.resolver(), timeout=cfg.dns.timeout
    )


def rewrite_recipient(ctx: Settings, recipient: str) -> str | Reply | None:
    """A bounce to one of our SRS addresses: the original sender it goes back to.

    None when `recipient` is no SRS address; a Reply when it is forged or too old.
    """
    cfg = ctx.config
    local, _, domain = recipient.rpartition("@")
    if not srs.is_srs(local):
        return None
    codec = srs_codec(cfg)
    if domain.lower() != codec.domain:
        return None  # someone else's SRS address: an ordinary recipient
    try:
        return codec.reverse(recipient)
    except srs.SRSError as exc:
        log.info("refused SRS address <%s>: %s", recipient, exc)
        return srs.FORGED


def forward_sender(ctx: Settings, sender: str, *, original: str, recipient: str) -> str:
    """The envelope sender for delivering to `recipient`, which `original` forwards to.

    Mail forwarded to an outside address gets an SRS sender in our domain, so
    the receiver's SPF check sees us; anything else keeps its sender.
    """
    cfg = ctx.config
    local = cfg.mailroom.domains
    if not sender or "@" not in sender or "@" not in original:
        return sender
    if original.rsplit("@", 1)[1].lower() not in local or recipient.rsplit("@", 1)[1].lower() in local:
        return sender
    if sender.rsplit("@", 1)[1].lower() in local and not srs.is_srs(sender.rsplit("@", 1)[0]):
        return sender  # ours already: SPF passes as it is
    return srs_codec(cfg).forward(sender)
