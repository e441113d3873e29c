"""The MTA's listeners: the public one (port 25 role) and the internal one (for the MSA).

Public: mail is accepted only for local domains, and only for recipients that
exist (550 5.1.1 at RCPT, so we never accept-then-bounce to a forged sender);
relaying is refused (554 5.7.1) unless the client is in trusted_networks.
Internal: bound to loopback, it relays anywhere and keeps the MSA's trace id.

The 250 after DATA is sent only after `queue.enqueue` committed the message
and its recipients (fsync'd); then the queue manager is woken.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import re
import shutil

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from common import reply as R
from common.address import domain_of
from common.daemon import Context, serve_until_stopped
from common.listener import Handler, MailEnvelope, MailSession, in_networks, limits_from, serve
from common.log import is_trace_id, new_trace_id, trace_id
from common.models import add_event
from common.reply import Reply
from mta import aliases, queue

log = logging.getLogger("smtpd")

_HEADER_END = re.compile(rb"\r\n\r\n|\A\r\n")


class SMTPHandler(Handler):
    def __init__(self, ctx: Context, *, internal: bool) -> None:
        self.ctx = ctx
        self.internal = internal
        self.ehlo_keywords = ("XTRACE",) if internal else ()
        # RCPT address -> what it expands to, for the transaction in progress.
        self.expanded: dict[str, aliases.Expansion] = {}

    def reset(self, session: MailSession) -> None:
        self.expanded = {}

    def may_relay(self, session: MailSession) -> bool:
        return self.internal or in_networks(session.client_ip, self.ctx.config.mta.trusted_networks)

    async def mail(self, session: MailSession, envelope: MailEnvelope, sender: str) -> Reply:
        # Measured where the queue is written (the database's disk), not where we run.
        free = shutil.disk_usage(self.ctx.config.queue_dir).free
        if free < self.ctx.config.mta.min_free_disk:
            log.warning("refusing mail: only %d bytes free", free)
            return R.DISK_LOW
        given = envelope.params.get("XTRACE", "")
        # Only the internal hop may name the trace id; anything else gets a new one.
        envelope.trace_id = given if self.internal and is_trace_id(given) else new_trace_id()
        trace_id.set(envelope.trace_id)
        return R.SENDER_OK

    async def rcpt(self, session: MailSession, envelope: MailEnvelope, recipient: str) -> Reply:
        cfg = self.ctx.config
        if "@" not in recipient:  # <postmaster>, RFC 5321 4.5.1
            recipient = f"postmaster@{cfg.mailroom.domains[0]}"
        if not cfg.is_local_domain(domain_of(recipient)):
            if self.may_relay(session):
                self.expanded[recipient] = aliases.Expansion([], [recipient])
                return R.RECIPIENT_OK
            log.info("relay denied to=<%s> client=%s", recipient, session.client_ip)
            return R.RELAY_DENIED
        try:
            found = await self.ctx.db.run(self._expand, recipient)
        except aliases.AliasLoop:
            return R.MAIL_LOOP.with_text("Alias loop for this recipient")
        if found is None:
            log.info("refused to=<%s>: user unknown", recipient)
            return R.UNKNOWN_USER
        self.expanded[recipient] = found
        return R.RECIPIENT_OK

    def _expand(self, recipient: str) -> aliases.Expansion | None:
        cfg = self.ctx.config
        with self.ctx.db.read() as s:
            return aliases.expand(
                s, recipient, local_domains=cfg.mailroom.domains,
                delimiter=cfg.mda.recipient_delimiter,
            )

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        assert isinstance(envelope.content, bytes) and envelope.mail_from is not None
        cfg = self.ctx.config
        header = _header_of(envelope.content)
        hops = len(re.findall(rb"(?im)^received:", header))
        if hops > cfg.mta.max_hops:
            log.warning("mail loop: %d Received headers", hops)
            return R.MAIL_LOOP
        now = self.ctx.clock.now()
        body = self._received_header(session, envelope, now) + envelope.content
        recipients: list[queue.QueuedRecipient] = []
        for rcpt in envelope.rcpt_tos:
            exp = self.expanded[rcpt]
            for a in [*exp.local, *exp.remote]:
                if all(a != r.address for r in recipients):
                    recipients.append(queue.QueuedRecipient(a, rcpt))
        try:
            # Group commit: sessions finishing DATA together share one fsync'd
            # commit, and each 250 still waits for the commit that holds its message.
            await self.ctx.db.write_batched(self._store, envelope, body, recipients, session, header, now)
        except (OSError, OperationalError) as exc:
            log.error("cannot queue: %s", exc)
            full = "full" in str(exc) or getattr(exc, "errno", None) == 28
            return R.DISK_LOW if full else R.LOCAL_ERROR
        log.info(
            "queued from=<%s> size=%d nrcpt=%d client=%s",
            envelope.mail_from, len(body), len(recipients), session.client_ip,
        )
        queue.wake_qmgr(cfg.qmgr_socket)
        return Reply(250, "2.0.0", f"Ok: queued as {envelope.trace_id}")

    def _store(
        self,
        s: Session,
        envelope: MailEnvelope,
        body: bytes,
        recipients: list[queue.QueuedRecipient],
        session: MailSession,
        header: bytes,
        now: dt.datetime,
    ) -> None:
        add_event(
            s, envelope.trace_id, "mta", "received", time=now,
            detail=f"{'internal' if self.internal else 'smtp'} from {session.client_ip}"
            f" helo={session.host_name}",
        )
        queue.enqueue(
            s, trace=envelope.trace_id, sender=envelope.mail_from or "", body=body,
            recipients=recipients, now=now, client=session.client_ip,
            message_id=_message_id(header),
        )

    def _received_header(self, session: MailSession, envelope: MailEnvelope, now: dt.datetime) -> bytes:
        # RFC 5321 4.4: who we heard from, who we are, how, the id, and when.
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if session.tls:
            proto += "S"
        if session.user:
            proto += "A"
        rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        date = email.utils.format_datetime(now.replace(tzinfo=dt.UTC))
        text = (
            f"Received: from {session.host_name} ([{session.client_ip}])\r\n"
            f"\tby {self.ctx.config.mailroom.hostname} (Mailroom) with {proto}"
            f" id {envelope.trace_id}{rcpt};\r\n\t{date}\r\n"
        )
        return text.encode("utf-8", "surrogateescape")


def _header_of(content: bytes) -> bytes:
    m = _HEADER_END.search(content)
    return content[: m.start() + 2] if m else content


def _message_id(header: bytes) -> str:
    m = re.search(rb"(?im)^message-id:\s*(<[^>\r\n]{1,900}>)", header)
    return m.group(1).decode("utf-8", "replace") if m else ""


# The listener settings this daemon serves; the skeleton binds them before the switch.
LISTENERS = ("mta.smtp", "mta.internal")


async def run(ctx: Context) -> None:
    cfg = ctx.config
    limits = limits_from(cfg.smtp)
    public = await serve(
        cfg.mta.smtp, lambda: SMTPHandler(ctx, internal=False),
        hostname=cfg.mailroom.hostname, limits=limits, tls_context=ctx.tls(), sock=ctx.socket("mta.smtp"),
    )
    internal = await serve(
        cfg.mta.internal, lambda: SMTPHandler(ctx, internal=True),
        hostname=cfg.mailroom.hostname,
        limits=limits_from(cfg.smtp, max_connections_per_client=cfg.smtp.max_connections),
        sock=ctx.socket("mta.internal"),
    )
    log.info("SMTP listening on %s, internal on %s", cfg.mta.smtp, cfg.mta.internal)
    await serve_until_stopped(ctx, [public, internal])
