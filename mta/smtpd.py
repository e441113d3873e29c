"""The MTA's listeners: the public one (port 25 role) and the internal one (for the MSA).

Public: mail is accepted only for local domains, and only for recipients that
exist (550 5.1.1 at RCPT, so we never accept-then-bounce to a forged sender);
relaying is refused (554 5.7.1) unless the client is in trusted_networks.
Internal: it relays anywhere, signs with our keys and keeps the MSA's trace id,
so it takes only our MSA.  On its Unix socket (the default) the kernel says who
connected (SO_PEERCRED) and any uid but the daemons' own is turned away (554
5.7.1); over TCP, MAIL needs AUTH with the installation's secret first (530
5.7.0; common/hop_secret.py).  XTRACE must be a well-formed id (501 5.5.4) that
names no message already queued (554 5.5.4).

The 250 after DATA is sent only after `queue.accept` committed the message
and its recipients (fsync'd); then the queue manager is woken (mta/wakeup.py).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from sqlalchemy.exc import IntegrityError, OperationalError

from common import headers, hop_secret, hop_tls, message, verdict
from common import reply as R
from common.address import domain_of
from common.clock import Clock
from common.config import Config
from common.daemon import Context, serve_until_stopped
from common.db import Database
from common.directory import Directory, Snapshot
from common.hop_tls import HopTLS
from common.log import is_trace_id, new_trace_id, trace_id
from common.reply import Reply, SMTPError
from common.smtp import Handler, MailEnvelope, MailSession, in_networks, limits_from, serve
from mta import aliases, bounce, queue, resubmit, wakeup
from mta.auth import mailauth
from mta.options import Asked

log = logging.getLogger("smtpd")

@dataclass(frozen=True)
class ReceivePolicy:
    """What one MTA listener accepts, and where it queues."""

    hostname: str
    local_domains: tuple[str, ...]  # lower-case; the first names <postmaster>
    internal: bool  # the MSA's listener: relays anywhere, keeps the trace id
    trusted_networks: tuple[str, ...]  # may relay through the public listener
    recipient_delimiter: str
    max_hops: int
    min_free_disk: int
    queue_dir: Path  # whose disk must have min_free_disk
    qmgr_socket: Path
    resubmission_window: float  # seconds; 0: every message is queued, even a repeat
    # The internal listener's client: the uid our MSA runs as (the daemons' own, on a
    # Unix socket) and the secret it logs in with (over TCP).
    msa_uid: int = -1
    secret: str = ""

    @classmethod
    def from_config(cls, cfg: Config, *, internal: bool) -> ReceivePolicy:
        return cls(
            hostname=cfg.mailroom.hostname, local_domains=tuple(d.lower() for d in cfg.mailroom.domains),
            internal=internal, trusted_networks=tuple(cfg.mta.trusted_networks),
            recipient_delimiter=cfg.mda.recipient_delimiter, max_hops=cfg.mta.max_hops,
            min_free_disk=cfg.mta.min_free_disk, queue_dir=cfg.queue_dir, qmgr_socket=cfg.qmgr_socket,
            resubmission_window=cfg.mta.resubmission_window,
            # Called after the switch to the Mailroom user: the uid every daemon runs as.
            msa_uid=os.getuid() if internal else -1,
            secret=hop_secret.load(cfg.run_dir) if internal else "",
        )


class SMTPHandler(Handler):
    # The queue stores these and the queue manager honours or passes them on.
    offers_dsn = True
    offers_requiretls = True
    # Stored as it came; the queue manager sends it on only with BDAT to a hop
    # offering BINARYMIME (our MDA does), and bounces it (5.6.3) otherwise.
    offers_binarymime = True

    def __init__(
        self, policy: ReceivePolicy, db: Database, clock: Clock, auth: Callable[[], mailauth.MailAuth],
        directory: Directory | None = None, *, peers: HopTLS | None = None,
    ) -> None:
        self.policy = policy
        # The internal listener on an address other hosts reach: which MSAs are ours (common/hop_tls.py).
        self.peers = peers
        self.directory = directory or Directory(db.read_engine)
        self.auth = auth  # sender authentication, signing, SRS and the filter: the MailAuth in force
        self.db = db
        self.clock = clock
        self.internal = policy.internal
        # XREDIRECT=<user>: the MDA passes on a message for that user's Sieve redirect (mda/outbound.py).
        self.ehlo_keywords = ("XTRACE", "XREDIRECT") if policy.internal else ()
        self.requiretls_in_clear = policy.internal  # our MSA took it over TLS
        # Over TCP the MSA logs in with the installation's secret, on loopback (common/hop_secret.py);
        # between hosts (a guarded listener) its node certificate is the proof, and no AUTH is offered.
        self.offers_auth = self.auth_in_clear = policy.internal and peers is None
        # RCPT address -> what it expands to, for the transaction in progress.
        self.expanded: dict[str, aliases.Expansion] = {}
        # RCPT address -> the "expanded" notice its sender asked for (NOTIFY=SUCCESS).
        self.notices: dict[str, bounce.Failure] = {}

    def reset(self, session: MailSession) -> None:
        self.expanded = {}
        self.notices = {}

    def from_msa(self, session: MailSession) -> bool:
        """The internal listener's client is our MSA: on a Unix socket it runs as the
        daemons' uid (SO_PEERCRED); over TCP between hosts its certificate names one of
        our nodes (common/hop_tls.py); over TCP on loopback it logged in with the
        installation's secret."""
        if not self.internal:
            return False
        if session.peer_uid is not None:
            return session.peer_uid == self.policy.msa_uid
        if self.peers is not None:
            return self.peers.admits(session)
        return session.user is not None

    def may_relay(self, session: MailSession) -> bool:
        return self.from_msa(session) or (
            not self.internal and in_networks(session.client_ip, list(self.policy.trusted_networks))
        )

    def needs_login(self, session: MailSession) -> bool:
        # Over TCP on loopback: until the MSA's AUTH.  Between hosts the certificate proved it.
        return self.internal and session.peer_uid is None and self.peers is None

    async def connect(self, session: MailSession) -> None:
        if self.peers is not None and not self.peers.admits(session):
            log.warning("%s: refused, its certificate names no node of [cluster] peers", session.client_ip)
            raise SMTPError(R.NOT_A_PEER)
        if self.internal:
            if session.peer_uid is not None and not self.from_msa(session):
                log.warning("internal listener: refused a process of uid %d (only uid %d, the MSA's)",
                            session.peer_uid, self.policy.msa_uid)
                raise SMTPError(R.NOT_OUR_MSA)
            return
        if not self.may_relay(session) and (refusal := await self.auth().check_connect(session.client_ip)):
            raise SMTPError(refusal)

    async def authenticate(self, session: MailSession, login: str, password: str) -> None:
        if not self.internal or not hop_secret.matches(password, self.policy.secret):
            log.warning("internal listener: wrong secret from %s", session.client_ip)
            raise SMTPError(R.AUTH_FAILED)

    async def mail(self, session: MailSession, envelope: MailEnvelope, sender: str) -> None:
        if self.internal and not self.from_msa(session):
            raise SMTPError(R.AUTH_REQUIRED.with_text("Authentication required: this listener is for our MSA"))
        given = envelope.params.get("XTRACE", "")
        if given and not is_trace_id(given):
            raise SMTPError(R.TRACE_SYNTAX)
        # Measured where the queue is written (the database's disk), not where we run.
        free = shutil.disk_usage(self.policy.queue_dir).free
        if free < self.policy.min_free_disk:
            log.warning("refusing mail: only %d bytes free", free)
            raise SMTPError(R.DISK_LOW)
        # Only the internal hop may name the trace id (the public one does not take XTRACE).
        envelope.trace_id = given or new_trace_id()
        trace_id.set(envelope.trace_id)

    async def rcpt(self, session: MailSession, envelope: MailEnvelope, recipient: str) -> None:
        policy = self.policy
        given = recipient  # the key DATA looks the expansion up by (envelope.rcpt_tos)
        if "@" not in recipient:  # <postmaster>, RFC 5321 4.5.1
            recipient = f"postmaster@{policy.local_domains[0]}"
        srs_target = self.auth().rewrite_recipient(recipient)  # a bounce to an SRS sender
        if isinstance(srs_target, Reply):
            raise SMTPError(srs_target)
        if srs_target is not None:
            self.expanded[given] = aliases.Expansion([], [srs_target])
            return
        if domain_of(recipient) not in policy.local_domains:
            if self.may_relay(session):
                self.expanded[given] = aliases.Expansion([], [recipient])
                return
            log.info("relay denied to=<%s> client=%s", recipient, session.client_ip)
            raise SMTPError(R.RELAY_DENIED)
        try:
            # The copy, when it is known current without a thread hop; else asked in a thread.
            snapshot = self.directory.if_current()
            found = (self._expand(recipient, snapshot) if snapshot is not None
                     else await self.db.run(self._expand, recipient))
        except aliases.AliasLoop:
            raise SMTPError(R.MAIL_LOOP.with_text("Alias loop for this recipient")) from None
        if found is None:
            log.info("refused to=<%s>: user unknown", recipient)
            raise SMTPError(R.UNKNOWN_USER)
        self.expanded[given] = found
        self._note_expansion(envelope, given, recipient, found)

    def _note_expansion(
        self, envelope: MailEnvelope, given: str, recipient: str, found: aliases.Expansion
    ) -> None:
        """An alias (or list) with several targets and NOTIFY=SUCCESS: the sender gets one
        "expanded" notice for it now, and the targets go on without SUCCESS (RFC 3461
        5.2.7.3; the action, RFC 3464 2.3.3), so the sender is not told of each delivery
        behind the alias.  An alias with one target is forwarding: NOTIFY goes on as it
        is (RFC 3461 5.2.7.2), and whoever delivers it reports success."""
        self.notices.pop(given, None)
        params = envelope.rcpt_params.get(given)
        notify = params.get("NOTIFY", "").split(",") if params else []
        if params is None or "SUCCESS" not in notify or len(found.local) + len(found.remote) < 2:
            return
        # What the targets are stored with (data() reads it): failures and delays still reported.
        params["NOTIFY"] = ",".join(n for n in notify if n != "SUCCESS") or "NEVER"
        self.notices[given] = bounce.Failure(
            recipient, given, R.OK.with_text("Alias expanded"), orcpt=params.get("ORCPT", ""),
            action="expanded",
        )

    def _expand(self, recipient: str, snapshot: Snapshot | None = None) -> aliases.Expansion | None:
        # From the in-memory copy of users and aliases (one integer read to
        # know it is current), not a read transaction of ORM loads per RCPT.
        return aliases.expand_from(
            snapshot or self.directory.current(), recipient, local_domains=list(self.policy.local_domains),
            delimiter=self.policy.recipient_delimiter,
        )

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        assert isinstance(envelope.content, bytes) and envelope.mail_from is not None
        header = message.header_of(envelope.content)
        # Before anything parses it (sender checks, DMARC, signing): within the limits,
        # or refused, so no header can hold the loop or a worker (common/headers.py).
        too_big = headers.check(header)
        if too_big is not None:
            log.warning("refused a header over the limits from %s: %s", session.client_ip, too_big)
            raise SMTPError(too_big)
        hops = len(re.findall(rb"(?im)^received:", header))
        if hops > self.policy.max_hops:
            log.warning("mail loop: %d Received headers", hops)
            raise SMTPError(R.MAIL_LOOP)
        now = self.clock.now()
        recipients: list[queue.QueuedRecipient] = []
        # A user's filter redirecting: that user is the original recipient, so the message leaves
        # with an SRS sender, as when an alias forwards (the queue manager's rule).
        redirector = envelope.params.get("XREDIRECT", "") if self.internal else ""
        if domain_of(redirector) not in self.policy.local_domains:
            redirector = ""
        for rcpt in envelope.rcpt_tos:
            exp = self.expanded[rcpt]
            dsn = envelope.rcpt_params.get(rcpt, {})
            for a in [*exp.local, *exp.remote]:
                if all(a != r.address for r in recipients):
                    recipients.append(
                        queue.QueuedRecipient(
                            a, redirector or rcpt, notify=dsn.get("NOTIFY", ""), orcpt=dsn.get("ORCPT", "")
                        )
                    )
        content, added = envelope.content, b""
        if self.may_relay(session):  # ours: DKIM-signed once, here, when it leaves our domains
            content = verdict.strip(content)  # no spam verdict but our filter's reaches the MDA
            added = await self.auth().sign_outgoing(
                content, trusted=True, recipients=[r.address for r in recipients]
            )
        else:  # from the Internet: SPF, DKIM, DMARC, ARC, then the content filter
            inbound = await self.auth().check_inbound(
                content, client_ip=session.client_ip, helo=session.host_name or "",
                mail_from=envelope.mail_from, recipients=list(envelope.rcpt_tos), trace=envelope.trace_id,
                deliver_to=[r.address for r in recipients],
            )
            if inbound.reply is not None:
                raise SMTPError(inbound.reply)
            content, added = inbound.content, inbound.headers
        body = self._received_header(session, envelope, now) + added + content
        p = envelope.params
        incoming = queue.Incoming(
            trace=envelope.trace_id, sender=envelope.mail_from, body=body, recipients=recipients,
            given=list(envelope.rcpt_tos), received=now, client=session.client_ip,
            arrival=f"{'internal' if self.internal else 'smtp'} from {session.client_ip}"
            f" helo={session.host_name}" + (" tls=yes" if session.tls else ""),
            # What the sender wrote, to know it again if sent twice (the signatures and
            # results we add carry times of their own): worked out before the write
            # transaction, not while holding the write lock.
            message_id=resubmit.message_id(header), digest=resubmit.digest(envelope.content),
            asked=Asked(ret=p.get("RET", ""), envid=p.get("ENVID", ""), body_type=envelope.body_type,
                        smtputf8=envelope.smtp_utf8, requiretls="REQUIRETLS" in p),
            notices=[self.notices[r] for r in dict.fromkeys(envelope.rcpt_tos) if r in self.notices],
            named=self.internal,  # by our MSA (XTRACE): it must name no message already queued
        )
        policy = self.policy
        try:
            # Group commit: sessions finishing DATA together share one fsync'd
            # commit, and each 250 still waits for the commit that holds its message.
            queued = await self.db.write_batched(
                queue.accept, incoming, policy.hostname, policy.local_domains, policy.resubmission_window
            )
        except queue.TraceTaken:
            log.warning("XTRACE %s names a message already queued: refused", envelope.trace_id)
            raise SMTPError(R.TRACE_TAKEN) from None
        except IntegrityError as exc:  # a race the check in queue.accept cannot see: one line, no traceback
            log.error("cannot queue: %s", str(exc.orig)[:200])
            raise SMTPError(R.LOCAL_ERROR) from None
        except (OSError, OperationalError) as exc:
            log.error("cannot queue: %s", exc)
            full = "full" in str(exc) or getattr(exc, "errno", None) == 28
            raise SMTPError(R.DISK_LOW if full else R.LOCAL_ERROR) from None
        if queued != envelope.trace_id:
            # The client never saw our first 250 and sent the same message again:
            # it gets the same answer, and nothing is queued twice.
            log.info("resubmission of %s from=<%s> client=%s", queued, envelope.mail_from, session.client_ip)
            return R.OK.with_text(f"Ok: queued as {queued}")
        # Naming the message: the queue manager claims it at once, by its id (before
        # our log line: the delivery need not wait for it).
        wakeup.send(self.policy.qmgr_socket, envelope.trace_id)
        log.info(
            "queued from=<%s> size=%d nrcpt=%d client=%s",
            envelope.mail_from, len(body), len(recipients), session.client_ip,
        )
        return R.OK.with_text(f"Ok: queued as {envelope.trace_id}")

    def _received_header(self, session: MailSession, envelope: MailEnvelope, now: dt.datetime) -> bytes:
        # RFC 5321 4.4: who we heard from, who we are, how, the id, and when.
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if session.tls:
            proto += "S"
        if session.user:
            proto += "A"
        rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        date = email.utils.format_datetime(now.replace(tzinfo=dt.UTC))
        # TCP-info is an address literal (RFC 5321 4.4); a Unix socket (the MSA's hand-off) has none.
        source = "(local socket)" if session.client_ip == "local" else f"([{session.client_ip}])"
        text = (
            f"Received: from {session.host_name} {source}\r\n"
            f"\tby {self.policy.hostname} (Mailroom) with {proto}"
            f" id {envelope.trace_id}{rcpt};\r\n\t{date}\r\n"
        )
        return text.encode("utf-8", "surrogateescape")


# The listener settings this daemon serves; the skeleton binds them before the switch.
LISTENERS = ("mta.smtp", "mta.internal")
# What sender authentication imports on first use (mta/auth/mailauth.py).
PRELOAD = (
    "mta.auth.checks", "mta.auth.dmarc", "mta.auth.dkim", "mta.auth.spf", "mta.auth.contentfilter", "nacl.signing",
)


async def run(ctx: Context) -> None:
    cfg = ctx.config
    limits = limits_from(cfg.smtp)

    directory = Directory(ctx.db.read_engine)  # one copy for every session of both listeners
    auth = mailauth.Current(lambda: ctx.config, ctx.resolver(), ctx.db)  # built again after a reload

    def handler(internal: bool, peers: HopTLS | None = None) -> partial[SMTPHandler]:
        return partial(
            SMTPHandler, ReceivePolicy.from_config(cfg, internal=internal), ctx.db, ctx.clock, auth, directory,
            peers=peers,
        )

    public = await serve(
        ctx.socket("mta.smtp"), handler(False),
        hostname=cfg.mailroom.hostname, limits=limits, tls_context=ctx.tls(),
    )
    servers = [public]
    # With [mta] processes > 1, a Unix-socket internal listener is served by the first process alone.
    # With [cluster] on, MSAs of other hosts reach its TCP addresses: TLS, our nodes only (common/hop_tls.py).
    plain, guarded = hop_tls.split(ctx.socket("mta.internal"), hops := ctx.hops())
    internal_limits = limits_from(cfg.smtp, max_connections_per_client=cfg.smtp.max_connections)
    if plain:
        servers.append(await serve(plain, handler(True), hostname=cfg.mailroom.hostname, limits=internal_limits))
    if guarded and hops is not None:
        servers.append(await serve(
            guarded, handler(True, hops), hostname=cfg.mailroom.hostname, limits=internal_limits,
            tls_context=hops.server, implicit_tls=True,
        ))
    log.info("SMTP listening on %s, internal on %s", ", ".join(cfg.mta.smtp), ", ".join(cfg.mta.internal))
    await serve_until_stopped(ctx, servers)
    await auth().kept()  # the DMARC verdicts still on their way to the database
