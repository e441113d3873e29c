"""The MSA: authenticated submission on the 587 role (STARTTLS) and the 465 role (TLS).

It keeps no queue.  It works as a before-queue proxy: at the first RCPT it
opens a session with the MTA's internal listener and passes each RCPT on,
so the user sees the MTA's own verdict; after DATA it fixes the message
(RFC 6409), hands it to the MTA and answers the client with the MTA's reply
(`250 2.0.0 Ok: queued as <TRACE-ID>`).  So the 250 is only ever said once
the MTA has the message on disk; if the MTA cannot be reached the client
hears 451 4.4.1 and keeps the message.

Who may send: only an authenticated user (AUTH over TLS only), and only as
one of their own addresses (common.users.addresses_of, plus +tags) in the
envelope (553 5.7.1) and in From:/Sender: and Resent-From:/Resent-Sender:
(550 5.7.1).  Limits: failed
logins per client address, messages and recipients per user per hour, and
connections per client address over both roles together ([msa] settings).

Started as root (production), it reads the TLS key and binds 587/465, then
becomes `[mailroom] user` before serving anyone.  That user must be able to
write the database, its -wal/-shm files and its folder (`chown -R USER:`
on the installation); the MSA checks this at start and stops with a message
saying so rather than failing at the first submission.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import ssl
from dataclasses import dataclass

from sqlalchemy import Connection

from common import counters, dsn, headers, hop_secret, message
from common import reply as R
from common.address import lookup_key
from common.clock import Clock
from common.config import Config
from common.daemon import Context, serve_until_stopped
from common.db import Database
from common.endpoint import Endpoint
from common.events import EventName, Hop
from common.log import new_trace_id, trace_id
from common.models import Message, add_event
from common.reply import Reply, SMTPError
from common.smtp import Connections, Handler, MailEnvelope, MailSession, limits_from, serve
from common.smtp_client import Client, NextHopError
from common.users import addresses_of, check_password, find_user
from msa import submission
from msa.auth import FailureTracker, RateLimiter

log = logging.getLogger("msa")


class SenderRefused(Exception):
    """The MTA refused MAIL FROM; its reply is passed on to the client at RCPT."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class SubmissionPolicy:
    """What the submission handler needs to know: the next hop, the limits, the names."""

    hostname: str
    next_hop: Endpoint  # the MTA's internal listener (its first address)
    next_hop_timeout: float
    recipient_delimiter: str  # alice+tag@... is alice's own address too
    max_auth_failures: int
    auth_failure_window: float
    auth_lockout: float
    max_messages_per_hour: int
    max_recipients_per_hour: int
    # Over TCP the MTA's internal listener takes MAIL only after AUTH with this (common/hop_secret.py);
    # its Unix socket knows us by our uid instead.
    next_hop_secret: str = ""
    # The MTA on another host: TLS from the first byte, with this node's certificate (common/hop_tls.py),
    # which proves us instead of the secret.
    next_hop_tls: ssl.SSLContext | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> SubmissionPolicy:
        c = cfg.msa
        next_hop = cfg.endpoint("mta.internal")
        return cls(
            hostname=cfg.mailroom.hostname, next_hop=next_hop,
            next_hop_secret="" if next_hop.is_unix else hop_secret.load(cfg.run_dir),
            next_hop_timeout=cfg.smtp.idle_timeout,
            recipient_delimiter=cfg.mda.recipient_delimiter, max_auth_failures=c.max_auth_failures,
            auth_failure_window=c.auth_failure_window, auth_lockout=c.auth_lockout,
            max_messages_per_hour=c.max_messages_per_hour, max_recipients_per_hour=c.max_recipients_per_hour,
        )


class Limiters:
    """State shared by all sessions of the MSA process."""

    def __init__(self, policy: SubmissionPolicy, clock: Clock) -> None:
        self.failures = FailureTracker(
            max_failures=policy.max_auth_failures, window=policy.auth_failure_window, lockout=policy.auth_lockout,
            now=clock.monotonic,
        )
        self.messages = RateLimiter(policy.max_messages_per_hour, now=clock.monotonic)
        self.recipients = RateLimiter(policy.max_recipients_per_hour, now=clock.monotonic)


class SubmissionHandler(Handler):
    offers_auth = True
    # Passed on to the MTA, which stores and honours them.
    offers_dsn = True
    offers_requiretls = True
    # Passed on to the MTA with BDAT, exactly as it came.
    offers_binarymime = True

    def __init__(self, policy: SubmissionPolicy, db: Database, clock: Clock, limiters: Limiters) -> None:
        self.policy = policy
        self.db = db
        self.clock = clock
        self.limiters = limiters
        self.upstream: Client | None = None
        self.owned: set[str] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.lost = False  # the MTA session broke after accepting recipients

    def reset(self, session: MailSession) -> None:
        self.lost = False
        # Also called when the client hangs up mid-transaction: the MTA
        # session must not linger until its idle timeout.
        if self.upstream is not None:
            client, self.upstream = self.upstream, None
            task = asyncio.get_running_loop().create_task(client.quit())
            self._closing.add(task)  # keep a reference until it is done
            task.add_done_callback(self._closing.discard)

    def owns(self, address: str) -> bool:
        """The user's own address or alias, also with a +tag (alice+lists@...)."""
        a = address.lower()
        if a in self.owned:
            return True
        delimiter = self.policy.recipient_delimiter
        return bool(delimiter) and "@" in a and lookup_key(a, delimiter) in self.owned

    async def connect(self, session: MailSession) -> None:
        if self.limiters.failures.is_locked(session.client_ip):
            raise R.SMTPError(R.TOO_MANY_AUTH_FAILURES)

    async def authenticate(self, session: MailSession, login: str, password: str) -> None:
        ip = session.client_ip
        if self.limiters.failures.is_locked(ip):
            raise SMTPError(R.TOO_MANY_AUTH_FAILURES)
        ok, owned = await self.db.run(self._check, login, password)
        if ok:
            self.owned = owned
            log.info("authenticated %s from %s", login, ip)
            return
        await self._failed(session, f"authentication failed for {login[:64]!r}")
        raise SMTPError(R.AUTH_FAILED)

    async def auth_garbled(self, session: MailSession) -> None:
        # Credentials that do not even decode are a guess like any other: the same
        # count, delay and lockout, or a guesser would have a free channel.
        await self._failed(session, "undecodable AUTH credentials")

    async def _failed(self, session: MailSession, what: str) -> None:
        """Count a failed login, then wait the growing delay; 421 once the address is locked out."""
        ip = session.client_ip
        count = self.limiters.failures.failed(ip)
        counters.inc(counters.LOGIN_FAILURES, listener=session.listener)  # in memory: no write for an attacker
        log.warning("%s from %s (%d)", what, ip, count)
        if self.limiters.failures.is_locked(ip):
            raise SMTPError(R.TOO_MANY_AUTH_FAILURES)
        await asyncio.sleep(self.limiters.failures.delay(count))

    def _check(self, login: str, password: str) -> tuple[bool, set[str]]:
        with self.db.read() as s:
            user = find_user(s, login) if "@" in login else None
            if not check_password(user, password):
                return False, set()
            assert user is not None
            return True, addresses_of(s, user.address)

    async def mail(self, session: MailSession, envelope: MailEnvelope, sender: str) -> None:
        if session.user is None:
            raise SMTPError(R.AUTH_REQUIRED)
        if not self.owns(sender):
            log.warning("user %s may not send as <%s>", session.user, sender)
            raise SMTPError(R.SENDER_DENIED)
        if not self.limiters.messages.allow(session.user):
            raise SMTPError(R.RATE_LIMITED)
        envelope.trace_id = new_trace_id()
        trace_id.set(envelope.trace_id)

    async def rcpt(self, session: MailSession, envelope: MailEnvelope, recipient: str) -> Reply:
        assert session.user is not None and envelope.mail_from is not None
        if not self.limiters.recipients.allow(session.user):
            raise SMTPError(R.RATE_LIMITED)
        if self.lost:
            raise SMTPError(R.NEXT_HOP_UNAVAILABLE)
        try:
            if self.upstream is None:
                self.upstream = await self._open_upstream(envelope)
            given = envelope.rcpt_params.get(recipient, {})
            params = dsn.rcpt_params(notify=given.get("NOTIFY", ""), orcpt=given.get("ORCPT", ""))
            reply = await self.upstream.rcpt(recipient, tuple(params))
        except SenderRefused as exc:
            log.warning("MTA refused MAIL: %s", exc.reply)
            raise SMTPError(exc.reply) from None
        except NextHopError as exc:
            log.error("MTA unavailable: %s", exc.reply)
            self._drop_upstream()
            if envelope.rcpt_tos:
                # The recipients the MTA had accepted went with that session:
                # a new one would deliver to the later recipients only.
                self.lost = True
            raise SMTPError(R.NEXT_HOP_UNAVAILABLE) from None
        if not reply.is_ok:
            raise SMTPError(reply)  # the MTA's own verdict, passed on
        return reply

    async def _open_upstream(self, envelope: MailEnvelope) -> Client:
        client = await Client.connect(
            self.policy.next_hop, helo=self.policy.hostname, timeout=self.policy.next_hop_timeout,
            connect_timeout=10, tls=self.policy.next_hop_tls, implicit_tls=self.policy.next_hop_tls is not None,
        )
        if self.policy.next_hop_secret and "AUTH" in client.extensions:
            # Loopback only (the config allows nothing else): in the clear is safe here.
            login = await client.auth_plain(hop_secret.LOGIN, self.policy.next_hop_secret, clear_ok=True)
            if login.code != 235:
                client.close()
                log.error("the MTA refused the internal hop's secret: %s", login)
                raise NextHopError(R.NEXT_HOP_UNAVAILABLE)
        params = [f"XTRACE={envelope.trace_id}"]
        if envelope.smtp_utf8:
            params.append("SMTPUTF8")
        # What the client asked of delivery goes on to the MTA, which honours it.
        if envelope.body_type in ("8BITMIME", "BINARYMIME"):
            params.append(f"BODY={envelope.body_type}")
        params += dsn.mail_params(ret=envelope.params.get("RET", ""), envid=envelope.params.get("ENVID", ""))
        if "REQUIRETLS" in envelope.params:
            params.append("REQUIRETLS")
        reply = await client.mail(envelope.mail_from or "", tuple(params))
        if reply.code != 250:
            await client.quit()
            raise SenderRefused(reply)
        return client

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        assert isinstance(envelope.content, bytes) and session.user is not None
        hostname = self.policy.hostname
        header = message.header_of(envelope.content)
        # Bounded before anything parses it, and parsed in a worker thread: a
        # stranger's header never holds the event loop (common/headers.py).
        too_big = headers.check(header)
        if too_big is not None:
            log.warning("user %s sent a header over the limits: %s", session.user, too_big)
            raise SMTPError(too_big)
        for name in submission.SENDER_FIELDS:  # one at a time, so the refusal names the field
            try:
                shown = await asyncio.to_thread(submission.from_addresses, header, (name,))
            except submission.UnreadableHeader as exc:
                log.warning("user %s sent an unreadable header: %s", session.user, exc)
                unreadable = R.HEADER_SENDER_DENIED.with_text(f"{name}: header cannot be read unambiguously")
                raise SMTPError(unreadable) from None
            for a in shown:
                if not self.owns(a):
                    log.warning("user %s may not send with %s: %s", session.user, name, a)
                    raise SMTPError(R.HEADER_SENDER_DENIED.with_text(f"{name}: header address not owned by you"))
        now = self.clock.now()
        received = submission.received_header(
            helo=session.host_name or "unknown", client_ip=session.client_ip,
            hostname=hostname, user=session.user, trace=envelope.trace_id, now=now,
        )
        content = submission.fix(envelope.content, hostname=hostname, received=received, now=now)
        if self.upstream is None or self.lost:
            raise SMTPError(R.NEXT_HOP_UNAVAILABLE)
        try:
            if envelope.body_type == "BINARYMIME":
                reply = await self.upstream.bdat(content)
            else:
                reply = await self.upstream.data(content)
        except NextHopError as exc:
            log.error("MTA lost during DATA: %s", exc.reply)
            self._drop_upstream()
            # The MTA may have committed the message and died before its 250
            # reached us.  The queue is in the shared database: if the message
            # is there, it is the MTA's now, and a 451 would only make the
            # client send it a second time.
            if not await self.db.run(self._was_queued, envelope.trace_id):
                raise SMTPError(R.NEXT_HOP_UNAVAILABLE) from None
            reply = R.OK.with_text(f"Ok: queued as {envelope.trace_id}")
            log.info("the MTA had queued it before the connection broke")
        if reply.code == 250:
            try:
                await self.db.write_batched(
                    self._record, envelope, session, len(content), reply, now, relaxed=True
                )
            except Exception:
                # The MTA has the message: answering anything but its 250 now
                # would make the client send it twice.  Only the trace loses a line.
                log.exception("could not record the submission events")
        log.info("relayed from=<%s> user=%s nrcpt=%d: %s", envelope.mail_from, session.user,
                 len(envelope.rcpt_tos), reply)
        if not reply.is_ok:
            raise SMTPError(reply)  # the MTA's refusal, passed on
        return reply

    def _was_queued(self, trace: str) -> bool:
        with self.db.read() as s:
            return s.get(Message, trace) is not None

    @staticmethod
    def _record(
        s: Connection, envelope: MailEnvelope, session: MailSession, size: int, reply: Reply, now: dt.datetime
    ) -> None:
        # Trace events only (the message is the MTA's, durably): no fsync needed.
        add_event(
            s, envelope.trace_id, Hop.MSA, EventName.RECEIVED, time=now,
            detail=f"from=<{envelope.mail_from}> user={session.user} client={session.client_ip} size={size}"
            + (" tls=yes" if session.tls else ""),
        )
        add_event(s, envelope.trace_id, Hop.MSA, EventName.RELAYED, detail=str(reply))


# The listener settings this daemon serves; the skeleton binds them before the switch.
LISTENERS = ("msa.submission", "msa.submissions")


async def run(ctx: Context) -> None:
    cfg = ctx.config
    tls = ctx.tls()
    limits = limits_from(cfg.smtp, max_connections_per_client=cfg.msa.max_connections_per_client)
    policy = SubmissionPolicy.from_config(cfg)
    if (hops := ctx.hops()) is not None and (hop := hops.client_for(policy.next_hop)) is not None:
        # The MTA's guarded listener knows us by our certificate and offers no AUTH.
        policy = dataclasses.replace(policy, next_hop_tls=hop, next_hop_secret="")
    limiters = Limiters(policy, ctx.clock)

    def make() -> SubmissionHandler:
        return SubmissionHandler(policy, ctx.db, ctx.clock, limiters)

    # One count for both roles: the cap is per client address, not per port.
    common = dict(hostname=cfg.mailroom.hostname, limits=limits, tls_context=tls, connections=Connections())
    submission_server = await serve(
        ctx.socket("msa.submission"), make, require_starttls=True,
        **common,  # type: ignore[arg-type]
    )
    submissions_server = await serve(
        ctx.socket("msa.submissions"), make, implicit_tls=True,
        **common,  # type: ignore[arg-type]
    )
    log.info(
        "submission on %s (STARTTLS), %s (TLS)", ", ".join(cfg.msa.submission), ", ".join(cfg.msa.submissions)
    )
    await serve_until_stopped(ctx, [submission_server, submissions_server])
