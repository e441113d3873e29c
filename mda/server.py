"""The MDA: an LMTP server (RFC 2033) that writes mail into Maildir and mbox stores.

One hop, socket to disk: LHLO, MAIL FROM (with the trace id the queue manager
passes as XTRACE=), RCPT TO for each recipient (looked up in the database:
unknown is 550 5.1.1), DATA, then one reply per recipient after the message
is on disk (fsync'd).  The mailbox path always comes from the users table,
never from the address, so no address can point outside the mail root.

Each delivery records a `delivered` event with its path, each refusal a
`refused` event with the reply.  Our queue manager asks for them with the MAIL
parameter XRECORD ("the client records the outcome", common/lmtp_ext.py): then
the MDA writes no row of its own, each 250 carries the path (`path=...`), and
the queue manager records the MDA's events in the same transaction as its
settle.  A redelivery of a (trace id, recipient) that already has a
`delivered` event (the queue manager crashed before it recorded our 250) is
answered 250 without storing the message again; without such an event the
stores themselves recognise it (the Maildir name, the mbox journal), and with
XRETRY (an earlier attempt may have stored it) the Maildir copy is also looked
for in cur/, where a reader moves it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import errno
import hashlib
import logging
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, select

from common import hop_tls, lmtp_ext, message
from common import reply as R
from common.config import Config
from common.daemon import Context, serve_until_stopped
from common.db import Database
from common.directory import Directory, Snapshot, UserEntry
from common.endpoint import Endpoint
from common.events import EventName, Hop
from common.hop_tls import HopTLS
from common.log import is_trace_id, new_trace_id, trace_id
from common.models import Event, User, add_event
from common.reply import Reply, SMTPError
from common.smtp import Handler, MailEnvelope, MailSession, limits_from, serve
from mda import maildir, mbox
from mda.outbound import Outbound
from mda.quota import QuotaExceeded
from mda.rules import AutoReply, Rules, RulesPolicy, delivered_to
from mda.rules import Box as RulesBox

log = logging.getLogger("mda")

# Deliveries running at once in one MDA process (each in a thread: fsync, locks).
DELIVERY_THREADS = 32
# How often the MDA sweeps stale files out of every Maildir's tmp/ (also once at start).
TMP_CLEAN_INTERVAL = 3600.0


@dataclass(frozen=True)
class Mailbox:
    user: str
    store: str  # maildir | mbox
    path: Path
    quota: int
    mailbox: str = ""  # the users table's name for it (where the user's Sieve scripts live)


@dataclass(frozen=True)
class DeliveryPolicy:
    """What the LMTP handler needs to know: where mailboxes live and how to name and lock them."""

    hostname: str
    mail_root: Path
    recipient_delimiter: str
    lock_timeout: float
    # Users' Sieve scripts (mda/rules.py): their size limit, and where and how often
    # their redirects and vacation replies are sent (the MTA's internal listener).
    sieve_max_size: int = 64 * 1024
    sends_per_hour: int = 500
    internal: Endpoint | None = None
    send_timeout: float = 60.0
    # The internal listener on another host: TLS with this node's certificate (common/hop_tls.py).
    internal_tls: ssl.SSLContext | None = None
    # Our own domains: a Sieve refusal may become a bounce to a sender in them (mda/rules.py).
    local_domains: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> DeliveryPolicy:
        return cls(
            hostname=cfg.mailroom.hostname, mail_root=cfg.mail_root.resolve(),
            recipient_delimiter=cfg.mda.recipient_delimiter, lock_timeout=cfg.mda.lock_timeout,
            sieve_max_size=cfg.mda.sieve_max_size, sends_per_hour=cfg.msa.max_messages_per_hour,
            internal=cfg.endpoint("mta.internal"), send_timeout=min(cfg.smtp.idle_timeout, 60.0),
            local_domains=tuple(d.lower() for d in cfg.mailroom.domains),
        )


class LMTPHandler(Handler):
    ehlo_keywords = ("XTRACE", lmtp_ext.XRECORD, lmtp_ext.XRETRY)
    # A BODY=BINARYMIME message is stored with its body octets as they came.
    offers_binarymime = True

    def __init__(
        self, policy: DeliveryPolicy, db: Database, directory: Directory | None = None, *,
        peers: HopTLS | None = None,
    ) -> None:
        self.policy = policy
        # On an address other hosts reach (common/hop_tls.py): which queue managers are ours.
        self.peers = peers
        self.db = db
        self.directory = directory or Directory(db.read_engine)
        self.mail_root = policy.mail_root
        # Each accepted recipient: its users-table entry and the directory generation it came from.
        self.mailboxes: dict[str, tuple[UserEntry, int]] = {}
        self.rules: Rules | None = None  # made at the first DATA, on the daemon's event loop

    def reset(self, session: MailSession) -> None:
        self.mailboxes = {}

    async def connect(self, session: MailSession) -> None:
        if self.peers is not None and not self.peers.admits(session):
            log.warning("%s: refused, its certificate names no node of [cluster] peers", session.client_ip)
            raise SMTPError(R.NOT_A_PEER)

    async def mail(self, session: MailSession, envelope: MailEnvelope, sender: str) -> None:
        # The LMTP listener is loopback-only, or takes only our own nodes (config
        # check, common/hop_tls.py), so the queue manager's trace id is trusted here.
        given = envelope.params.get("XTRACE", "")
        envelope.trace_id = given if is_trace_id(given) else new_trace_id()
        trace_id.set(envelope.trace_id)

    async def rcpt(self, session: MailSession, envelope: MailEnvelope, recipient: str) -> None:
        # From the copy of the users table in memory, with no thread hop: the
        # delivery (the transaction's one hop) checks that the copy is still
        # current before it stores anything.  A recipient the copy does not know
        # may have been added a moment ago: then the database is asked here.
        delimiter = self.policy.recipient_delimiter
        snapshot = self.directory.cached()
        user = snapshot.user(recipient, delimiter) if snapshot is not None else None
        if user is None or snapshot is None:
            snapshot = await self.db.run(self.directory.current)
            user = snapshot.user(recipient, delimiter)
        if user is not None:
            # Whether its mailbox stays inside the mail root, as last seen (the
            # delivery looks again before it stores: a symlink may have moved since).
            key = (self.mail_root, user.mailbox)
            if key not in _inside_root:
                await self.db.run(self._mailbox, user)
            if _inside_root.get(key) is None:
                user = None
        if user is None:
            log.info("refused to=<%s>: user unknown", recipient)
            if lmtp_ext.XRECORD not in envelope.params:
                await self.db.write_batched(
                    self._record, envelope.trace_id, [(recipient, R.UNKNOWN_USER, "")], relaxed=True
                )
            raise SMTPError(R.UNKNOWN_USER)
        self.mailboxes[recipient] = (user, snapshot.generation)

    def _lookup(self, snapshot: Snapshot, recipient: str, user: UserEntry, generation: int) -> Mailbox | None:
        """The mailbox of a recipient accepted at RCPT from the directory as it was at
        `generation`, by the directory as it is now, `snapshot` (None: the user is gone,
        or its mailbox would leave the mail root).  Blocking: called in the delivery thread."""
        if snapshot.generation != generation:
            found = snapshot.user(recipient, self.policy.recipient_delimiter)
            if found is None:
                log.info("refused to=<%s>: user unknown (removed since RCPT)", recipient)
                return None
            user = found
        return self._mailbox(user)

    def _mailbox(self, user: UserEntry) -> Mailbox | None:
        """The user's mailbox, or None when its path would leave the mail root."""
        try:
            path = (self.mail_root / user.mailbox).resolve()
        except (ValueError, OSError):  # a NUL in the stored name, a symlink loop
            path = Path("/")
        if len(_inside_root) > 100_000:
            _inside_root.clear()
        if not user.mailbox or not path.is_relative_to(self.mail_root) or path == self.mail_root:
            _inside_root[(self.mail_root, user.mailbox)] = None
            log.error("user %s has a mailbox outside the mail root (%r); refusing", user.address, user.mailbox)
            return None
        _inside_root[(self.mail_root, user.mailbox)] = path
        return Mailbox(user.address, user.store, path, user.quota, user.mailbox)

    async def refused(self, session: MailSession, envelope: MailEnvelope, reply: Reply) -> None:
        # Too big or a line too long: the trace should say so for each recipient.
        if lmtp_ext.XRECORD in envelope.params:
            return  # the client records each recipient's reply itself
        outcomes = [(rcpt, reply, "") for rcpt in dict.fromkeys(envelope.rcpt_tos)]
        try:
            await self.db.write_batched(self._record, envelope.trace_id, outcomes, relaxed=True)
        except Exception:
            log.exception("could not record the refusal events")

    async def data(self, session: MailSession, envelope: MailEnvelope) -> list[Reply]:
        assert isinstance(envelope.content, bytes) and envelope.mail_from is not None
        # The listener has refused bare CR and LF, so every line ends in CRLF:
        # store LF, as Postfix's local/virtual agents and Dovecot do.  A binary
        # body (BINARYMIME, RFC 3030) has no lines: only its header is text.
        if envelope.body_type == "BINARYMIME":
            header, blank, rest = message.split(envelope.content)
            body = header.replace(b"\r\n", b"\n") + b"\n" + rest if blank else envelope.content
        else:
            body = envelope.content.replace(b"\r\n", b"\n")
        if self.rules is None:
            self.rules = self._make_rules(asyncio.get_running_loop())
        try:
            # Not in the database pool: a delivery may wait up to lock_timeout
            # for an mbox lock, and must not hold up other sessions' lookups.
            auto: list[AutoReply] = []
            call = partial(
                contextvars.copy_context().run, self._deliver_all, envelope.trace_id, envelope.mail_from,
                envelope.rcpt_tos, body, lmtp_ext.XRECORD in envelope.params, lmtp_ext.XRETRY in envelope.params, auto,
            )
            replies, outcomes = await asyncio.get_running_loop().run_in_executor(_delivery_threads(), call)
            if auto:  # vacation replies: sent after the delivery, never holding it up
                _background(self.rules.send_replies(auto))
        except Exception:
            # Never a single reply in LMTP (the client would wait for the rest).
            log.exception("delivery failed")
            return [R.LOCAL_ERROR] * len(envelope.rcpt_tos)
        if lmtp_ext.XRECORD in envelope.params:
            # The queue manager records the outcomes (paths in the replies)
            # with its settle: no write transaction here at all.
            return replies
        try:
            # Events of sessions finishing together share one commit, not fsync'd:
            # the 250 rests on the fsync'd mailbox file, not on this row (the row
            # survives a killed process; only a power cut could lose it).
            await self.db.write_batched(self._record, envelope.trace_id, outcomes, relaxed=True)
        except Exception:
            # The mail is on disk: the 250s stand (saying 451 now would store it twice).
            log.exception("could not record the delivery events")
        return replies

    def _deliver_all(
        self, trace: str, sender: str, recipients: list[str], body: bytes, path_in_reply: bool = False,
        retry: bool = False, auto: list[AutoReply] | None = None,
    ) -> tuple[list[Reply], list[tuple[str, Reply, str]]]:
        """Store the message for each recipient; returns the replies and the events to record."""
        trace_id.set(trace)
        results: dict[str, tuple[Reply, str]] = {}
        # Deliveries of this trace id already recorded (one query for every recipient).
        # A first hand-off from a client that records the outcomes itself (XRECORD
        # without XRETRY) cannot have reached us before: nothing to look up, and the
        # stores' own names and journals still refuse a second copy.
        earlier = {} if path_in_reply and not retry else self._earlier_deliveries(trace)
        # The users table as it is now (one integer read when nothing changed since RCPT).
        snapshot = self.directory.current()
        for rcpt in recipients:
            if rcpt in results:
                continue  # the same RCPT twice: one copy, the same answer twice
            box = self._lookup(snapshot, rcpt, *self.mailboxes[rcpt])
            if box is None:
                results[rcpt] = (R.UNKNOWN_USER, "")
                continue
            try:
                path = self._deliver_one(trace, sender, rcpt, box, body, earlier.get(rcpt), retry=retry, auto=auto)
                reply = R.OK.with_text(f"Ok: delivered to {box.store} ({trace})")
                if path_in_reply:
                    reply = lmtp_ext.with_path(reply, path)
                log.info("delivered to=<%s> %s=%s", rcpt, box.store, path)
            except SMTPError as exc:
                path, reply = "", exc.reply
                log.info("refused to=<%s>: %s", rcpt, reply)
            results[rcpt] = (reply, path)
        outcomes = [(rcpt, reply, path) for rcpt, (reply, path) in results.items()]
        return [results[rcpt][0] for rcpt in recipients], outcomes

    def _make_rules(self, loop: asyncio.AbstractEventLoop) -> Rules:
        p = self.policy
        outbound = None
        if p.internal is not None:
            outbound = Outbound(p.internal, hostname=p.hostname, timeout=p.send_timeout, loop=loop, tls=p.internal_tls)
        policy = RulesPolicy(p.hostname, p.mail_root, p.lock_timeout, p.sieve_max_size, p.sends_per_hour,
                             p.local_domains)
        return Rules(policy, self.db, outbound)

    @staticmethod
    def _record(s: Connection, trace: str, outcomes: list[tuple[str, Reply, str]]) -> None:
        for rcpt, reply, path in outcomes:
            event = EventName.DELIVERED if reply.is_ok else EventName.REFUSED
            add_event(s, trace, Hop.MDA, event, recipient=rcpt, detail=str(reply), path=path)

    def _earlier_deliveries(self, trace: str) -> dict[str, str]:
        """recipient -> path of the deliveries of this trace id already recorded."""
        with self.db.read_engine.connect() as conn:
            rows = conn.execute(_EARLIER, {"trace": trace}).all()
        return {rcpt: path for rcpt, path in reversed(rows)}  # the first one wins

    def _deliver_one(
        self, trace: str, sender: str, rcpt: str, box: Mailbox, body: bytes, earlier: str | None = None,
        *, retry: bool = False, auto: list[AutoReply] | None = None,
    ) -> str:
        if earlier is not None:
            log.info("to=<%s>: already delivered (%s), not storing again", rcpt, earlier)
            return earlier
        if delivered_to(body, rcpt):
            raise SMTPError(R.MAIL_LOOP.with_text(f"Mail loop: already delivered to {rcpt}"))
        content = f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n".encode() + body
        try:
            # The spam verdict and the user's Sieve script decide where it goes (mda/rules.py).
            assert self.rules is not None  # made by data(), on the event loop
            where = RulesBox(box.user, box.store, box.path, box.quota, box.mailbox)
            store = partial(self._store, trace, sender, rcpt, retry)
            return self.rules.deliver(trace, sender, rcpt, where, body, content, store, auto)
        except QuotaExceeded as exc:
            raise SMTPError(R.OVER_QUOTA.with_text(f"Mailbox full: quota of {box.quota} bytes exceeded")) from exc
        except mbox.LockTimeout as exc:
            raise SMTPError(R.MAILBOX_LOCKED) from exc
        except OSError as exc:
            log.error("cannot write %s: %s", box.path, exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SMTPError(R.DISK_LOW) from exc
            raise SMTPError(R.LOCAL_ERROR) from exc


    def _store(
        self, trace: str, sender: str, rcpt: str, retry: bool, box: RulesBox, folder: Path | None, content: bytes,
        name: str, flags: frozenset[str],
    ) -> str:
        """Store in the inbox (folder None) or in a folder of the box; the path stored at."""
        if box.store == "mbox":
            target = box.path if folder is None else folder
            # Each folder has its own journal, so the same id serves them all.
            mbox.deliver(
                target, content, sender, delivery_id=_delivery_id(trace, rcpt), lock_timeout=self.policy.lock_timeout,
                quota_limit=box.quota if folder is None else 0,
            )
            return str(target)
        unique = maildir.unique_name(trace, rcpt, self.policy.hostname)
        path, _ = maildir.deliver(
            box.path, content, unique, quota_limit=box.quota, look_in_cur=retry, folder=folder,
            flags="".join(_MAILDIR_FLAGS[f] for f in flags if f in _MAILDIR_FLAGS),
        )
        return str(path)


# IMAP system flags as Maildir info letters (the "2," part of a file name).
_MAILDIR_FLAGS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}

_threads: concurrent.futures.ThreadPoolExecutor | None = None
# (mail root, mailbox name) -> the mailbox's resolved path, or None when it leaves the mail
# root: what RCPT answers from without a thread hop.  Every delivery resolves again.
_inside_root: dict[tuple[Path, str], Path | None] = {}
_tasks: set[asyncio.Task[None]] = set()


def _delivery_threads() -> concurrent.futures.ThreadPoolExecutor:
    """The MDA's own threads for deliveries (an mbox lock, a redirect handed to the MTA may
    wait in one), apart from the event loop's default pool, which others in the process use."""
    global _threads
    if _threads is None:
        _threads = concurrent.futures.ThreadPoolExecutor(DELIVERY_THREADS, thread_name_prefix="delivery")
    return _threads


def _background(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)  # held until done (the loop keeps only a weak reference)
    task.add_done_callback(_tasks.discard)


_EARLIER = select(Event.recipient, Event.path).where(
    Event.trace_id == bindparam("trace"), Event.hop == Hop.MDA, Event.event == EventName.DELIVERED
).order_by(Event.id)


def _delivery_id(trace: str, rcpt: str) -> str:
    """One word naming this message for this recipient: a redelivery has the same."""
    return hashlib.sha256(f"{trace}\0{rcpt}".encode()).hexdigest()[:32]


def clean_all_tmp(ctx: Context) -> int:
    """Remove stale tmp/ files from every Maildir user's mailbox; returns how many."""
    root = ctx.config.mail_root.resolve()
    with ctx.db.read() as s:
        names = list(s.scalars(select(User.mailbox).where(User.store == "maildir")))
    removed = 0
    for name in names:
        try:
            path = (root / name).resolve()
        except (ValueError, OSError):
            continue
        if path.is_relative_to(root) and path != root:
            removed += maildir.clean_tmp(path)
    if removed:
        log.info("removed %d stale file(s) from Maildir tmp/ folders", removed)
    return removed


async def _clean_tmp_periodically(ctx: Context, interval: float = TMP_CLEAN_INTERVAL) -> None:
    while not ctx.stop.is_set():
        try:
            await ctx.db.run(clean_all_tmp, ctx)
        except Exception:
            log.exception("cleaning Maildir tmp/ folders failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stop.wait(), interval)


# The listener settings this daemon serves; the skeleton binds them before the switch.
LISTENERS = ("mda.lmtp",)


async def run(ctx: Context) -> None:
    cfg = ctx.config
    # Only our own queue manager connects: no per-client cap below the total.
    limits = limits_from(cfg.smtp, max_connections_per_client=cfg.smtp.max_connections)
    directory, hops = Directory(ctx.db.read_engine), ctx.hops()
    policy = DeliveryPolicy.from_config(cfg)
    if hops is not None and policy.internal is not None:
        policy = dataclasses.replace(policy, internal_tls=hops.client_for(policy.internal))
    # With [cluster] on, other hosts' queue managers reach the TCP addresses: TLS, our nodes only.
    plain, guarded = hop_tls.split(ctx.socket("mda.lmtp"), hops)
    servers = []
    if plain:
        servers.append(await serve(
            plain, partial(LMTPHandler, policy, ctx.db, directory), hostname=cfg.mailroom.hostname,
            limits=limits, lmtp=True,
        ))
    if guarded and hops is not None:
        servers.append(await serve(
            guarded, partial(LMTPHandler, policy, ctx.db, directory, peers=hops), hostname=cfg.mailroom.hostname,
            limits=limits, lmtp=True, tls_context=hops.server, implicit_tls=True,
        ))
    log.info("LMTP listening on %s%s", ", ".join(cfg.mda.lmtp), " (TCP: TLS, our nodes only)" if guarded else "")
    cleaner = asyncio.create_task(_clean_tmp_periodically(ctx))
    try:
        await serve_until_stopped(ctx, servers)
    finally:
        cleaner.cancel()
