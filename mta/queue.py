"""The durable queue: messages and their recipients in the shared database.

This module is the only code that changes queue state.  A recipient
(`recipients.state`) is in one of these states, and only these functions
move it:

    accept          (new)   -> queued      the MTA's listener, before its 250
    enqueue         (new)   -> queued      notices and reports we write ourselves
    claim           queued  -> active      the queue manager takes it to deliver, with a
                                           lease: a token and an expiry (`[queue] lease`)
    renew           active: the lease's expiry later, while its holder works
    settle          active  -> delivered   2xx from the next hop
                    active  -> bounced     5xx (a notice to the sender)
                    active  -> expired     4xx, and older than max_queue_lifetime (a notice)
                    active  -> queued      4xx: next_attempt later, on the retry schedule
    take_over       active  -> queued      its lease expired (any queue manager, any node)
    release_stale   active  -> queued      a dead queue manager of this node held it
    release_restored active -> queued      a database restored from a backup (cli/restore.py)
    bring_forward, make_due  queued: next_attempt now (the MDA is back; a flush)
    hold            a held message's queued recipients are not claimed (release undoes it)
    delete          queued/active -> deleted   (postsuper -d: nobody is told)
    return_to_sender  queued/active -> bounced (a notice to the sender)

delivered, bounced, expired and deleted are final; once every recipient of a
message is final its body is dropped (`drop_body_if_done`).  A message's
`warned` is set by settle once a delay warning went out.  Notices (bounces,
delay warnings, success notices) are messages of their own, queued by
`enqueue_dsn` in the same transaction as what called for them.

`accept` is the promise behind the MTA's 250: message, recipients and events
go in one transaction, committed with synchronous=FULL (the MTA's group
commit, common/db.py), before the reply is sent.  The queue manager's claims
and settles share relaxed (not fsync'd) commits: no reply rests on them, and
a lost one only means a recipient is delivered again.  A crash between claim
and settle leaves recipients active until their lease expires, then any queue
manager takes them over; a start puts back its own node's dead claims at once.
A settle writes only what its claim still holds (`still_held`, fencing): a
holder that froze or lost the database past its lease drops its results.  So
at worst a message is delivered twice (the MDA's stores absorb the repeat),
never lost.
The operator's actions (`mailroom queue`: flush, hold and release, delete,
return to sender) are at the end.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from sqlalchemy import Connection, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from common import dsn
from common import reply as R
from common.address import domain_of
from common.db import connection_of
from common.events import EventName, Hop
from common.log import new_trace_id
from common.models import (
    ACTIVE,
    BOUNCED,
    DELETED,
    DELIVERED,
    EXPIRED,
    FINAL_STATES,
    QUEUED,
    Message,
    Recipient,
    add_event,
    add_events,
    event_row,
)
from common.prepared import Prepared, insert_all
from common.reply import Reply
from mta import bounce, resubmit
from mta.options import Asked


class Outcome(StrEnum):
    """What one delivery attempt did to a recipient: the queue manager's decision.

    Recorded as the `qmgr` event of the same name (`EventName(outcome)`, common/events.py)."""

    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    DEFERRED = "deferred"


# The recipient state each outcome leaves behind.
STATE_AFTER = {
    Outcome.DELIVERED: DELIVERED, Outcome.BOUNCED: BOUNCED, Outcome.EXPIRED: EXPIRED, Outcome.DEFERRED: QUEUED,
}


@dataclass(frozen=True)
class Policy:
    retry_schedule: list[float]
    max_queue_lifetime: float
    delay_warning: float
    # The MDA is our own process: when it cannot be reached it is restarting, and
    # is back within seconds, so that hand-off is retried on its own, short
    # schedule rather than the minutes a remote host is given.
    local_retry_schedule: list[float] = field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 30.0, 60.0])

    def next_wait(self, attempts: int, *, local: bool = False) -> float:
        """Seconds to wait after the `attempts`-th failed try (1-based)."""
        schedule = self.local_retry_schedule if local else self.retry_schedule
        return schedule[min(attempts, len(schedule)) - 1]


def classify(
    reply: Reply, age: float, attempts: int, policy: Policy, *, mda_away: bool = False, warned: bool = True
) -> tuple[Outcome, float]:
    """The one decision: (outcome, seconds until the next try; 0 unless deferred).

    2xx delivered; 5xx bounced; 4xx deferred on the retry schedule (the short
    local one when the hand-off to our own MDA failed for a reason of this host:
    the MDA away, a local error), or expired once the
    message is `max_queue_lifetime` old.  `attempts` counts this one.

    A message whose sender has not been warned yet (`warned` False) is tried
    again no later than when it is `delay_warning` old: the warning goes with
    that attempt, so it comes when the setting says, not up to a retry interval
    (an hour) later.
    """
    if reply.code < 400:
        return Outcome.DELIVERED, 0.0
    if reply.code >= 500:
        return Outcome.BOUNCED, 0.0
    if age >= policy.max_queue_lifetime:
        return Outcome.EXPIRED, 0.0
    wait = policy.next_wait(attempts, local=mda_away)
    if not warned and policy.delay_warning > 0 and age < policy.delay_warning:
        wait = min(wait, policy.delay_warning - age)
    return Outcome.DEFERRED, wait


# --- accept: the MTA's listener queues a message --------------------------------------------------


@dataclass
class QueuedRecipient:
    address: str
    original: str
    notify: str = ""  # RFC 3461 NOTIFY, as the engine checked it
    orcpt: str = ""  # RFC 3461 ORCPT: "addr-type;address"


@dataclass(frozen=True)
class Incoming:
    """A message the MTA's listener received, as `accept` stores it."""

    trace: str
    sender: str
    body: bytes  # as queued: our Received field and the headers we added come first
    recipients: list[QueuedRecipient]  # aliases expanded
    given: list[str]  # the RCPT addresses as the client gave them (sent again, they are the same)
    received: dt.datetime
    client: str
    arrival: str  # the `received` event's detail: which listener, the client, its HELO, TLS
    message_id: str
    digest: str  # of what the sender wrote (mta/resubmit.py)
    asked: Asked  # what the sender asked of delivery (RET, ENVID, BODY, SMTPUTF8, REQUIRETLS)
    # The "expanded" success notices asked for (an alias of several targets given
    # NOTIFY=SUCCESS): queued in the commit that stores the message.
    notices: list[bounce.Failure] = field(default_factory=list)
    named: bool = False  # the client named the trace id (our MSA's XTRACE), so it may be taken


class TraceTaken(Exception):
    """XTRACE named a message already in the queue."""


def accept(conn: Connection, msg: Incoming, hostname: str, local_domains: Collection[str], window: float) -> str:
    """Queue a message the MTA received; returns the trace id its 250 names.

    In the caller's transaction, which backs the 250: the MTA's group commit,
    fsync'd before any reply it holds is sent.  A message the client sent
    again because it never saw our 250 (mta/resubmit.py; looked for within
    `window` seconds, 0: never) is not queued twice: the answer names the
    first one's trace id, and both traces say so.  Raises TraceTaken when
    the trace id the client named is a message's already.
    """
    # A trace id the client named (XTRACE) and already taken would mix two messages'
    # events and fail the insert.  Asked in this write transaction, so no race.
    if msg.named and _QUEUED.rows(conn, {"trace": msg.trace}):
        raise TraceTaken(msg.trace)
    # Inserted with the next events, in one statement.
    received = event_row(msg.trace, Hop.MTA, EventName.RECEIVED, time=msg.received, detail=msg.arrival)
    earlier = None
    if window > 0:
        earlier = resubmit.find(
            conn, message_id=msg.message_id, sender=msg.sender, originals=msg.given,
            digest=msg.digest, since=msg.received - dt.timedelta(seconds=window),
        )
    if earlier is not None:
        add_events(conn, [
            received,
            event_row(msg.trace, Hop.MTA, EventName.RESUBMITTED, time=msg.received,
                      detail=f"the same message as {earlier}: not queued"),
            event_row(earlier, Hop.MTA, EventName.RESUBMITTED, time=msg.received,
                      detail=f"sent again from {msg.client} as {msg.trace}: answered with this trace id"),
        ])
        return earlier
    a = msg.asked
    enqueue(
        conn, trace=msg.trace, sender=msg.sender, body=msg.body, recipients=msg.recipients, now=msg.received,
        client=msg.client, message_id=msg.message_id, digest=msg.digest,
        options={"ret": a.ret, "envid": a.envid, "body_type": a.body_type, "smtputf8": a.smtputf8,
                 "requiretls": a.requiretls},
        events_before=[received],
    )
    if msg.notices and msg.sender:  # never to <>
        enqueue_dsn(
            conn, hostname=hostname, trace=msg.trace, sender=msg.sender, original=msg.body,
            received=msg.received, failures=msg.notices, now=msg.received, hop=Hop.MTA, success=True,
            envid=a.envid, ret=a.ret, body_type=a.body_type, requiretls=a.requiretls,
            local=domain_of(msg.sender) in local_domains,
        )
    return msg.trace


_QUEUED = Prepared(select(Message.id).where(Message.id == bindparam("trace")))


def enqueue(
    conn: Connection | Session,
    *,
    trace: str,
    sender: str,
    body: bytes,
    recipients: list[QueuedRecipient],
    now: dt.datetime,
    client: str = "",
    message_id: str = "",
    hop: Hop = Hop.MTA,
    is_bounce: bool = False,
    digest: str = "",
    options: dict[str, object] | None = None,
    events_before: list[dict[str, object]] | None = None,
) -> None:
    """Add a message to the queue (the caller commits).

    `options` are what the sender asked of delivery (columns of Message: ret,
    envid, body_type, smtputf8, requiretls).  `events_before` (`event_row`s)
    go into the trace before its `queued` event, in the same statement.

    Plain Core INSERTs rather than ORM objects (or the ORM's bulk path): this
    runs for every message, and the ORM's unit of work cost the MTA about a
    fifth of its time (py-spy, load 1).  The MTA passes its group commit's
    Connection; a Session (the operator's commands, tests) works too.
    """
    conn = connection_of(conn)
    _INSERT_MESSAGE.run(
        conn,
        {"id": trace, "sender": sender, "size": len(body), "body": body, "received": now, "client": client,
         "message_id": message_id, "is_bounce": is_bounce, "digest": digest, "held": False, "warned": False,
         **_NO_OPTIONS, **(options or {})},
    )
    if recipients:
        _INSERT_RECIPIENT.run(
            conn,
            [
                {"message_id": trace, "address": r.address, "original": r.original, "state": QUEUED,
                 "next_attempt": now, "attempts": 0, "last_reply": "", "owner": "", "lease": "",
                 "lease_expires": None, "notify": r.notify, "orcpt": r.orcpt}
                for r in recipients
            ],
        )
    add_events(conn, [*(events_before or []), event_row(
        trace, hop, EventName.QUEUED, time=now,
        detail=f"from=<{sender}> size={len(body)} nrcpt={len(recipients)}"
        + (f" client={client}" if client else ""),
    )])


_INSERT_MESSAGE = Prepared(insert_all(Message))
# What a message asked of delivery when nothing was asked (the INSERT names every column).
_NO_OPTIONS = {"ret": "", "envid": "", "body_type": "7BIT", "smtputf8": False, "requiretls": False}
_INSERT_RECIPIENT = Prepared(insert_all(Recipient, leave_out=("id",)))


# --- claim: the queue manager takes due recipients ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """One recipient taken for a delivery round: all that the delivery and the settle read of it."""

    id: int
    address: str
    original: str  # as given at RCPT (a notice names it)
    attempts: int  # the tries before this one
    notify: str = ""  # RFC 3461 NOTIFY
    orcpt: str = ""  # RFC 3461 ORCPT: "addr-type;address"


@dataclass
class Job:
    """One message and the recipients claimed for this delivery round."""

    trace: str
    sender: str
    body: bytes
    received: dt.datetime
    warned: bool
    is_bounce: bool
    message_id: str
    owner: str  # who holds the claims (`owner_id`); the settle hands them back
    recipients: list[Claimed] = field(default_factory=list)
    # What the sender asked of delivery, read with the claim (one query per
    # batch, not one read transaction per message before each delivery).
    asked: Asked = field(default_factory=Asked)
    # How many of the message's recipients were unfinished (not in a final
    # state) once claimed, these included: when this job holds them all, its
    # settle knows whether the body can go without reading the states again.
    unfinished: int = 0
    # The token of this claim's lease: the settle must show it (`still_held`).
    lease: str = ""


# How many recipients one claim takes at most.
CLAIM_LIMIT = 200
# How long a claim lasts unless renewed, when the caller does not say ([queue] lease).
LEASE = 60.0


def claim(
    conn: Connection | Session, owner: str, now: dt.datetime, limit: int = CLAIM_LIMIT, *,
    traces: list[str] | None = None, lease: float = LEASE,
) -> list[Job]:
    """Take up to `limit` due recipients (grouped per message) and mark them active.

    The claim is a lease: each recipient gets the owner, a new token and an
    expiry `lease` seconds on, which the owner moves on while it works
    (`renew`).  A scan (no `traces`) first takes over every recipient whose
    lease expired, whoever held it (`take_over`), and claims it with the rest.

    With `traces`, only those messages' due recipients: the MTA's wake-up
    names the message it just queued, and it is claimed at once, by its id,
    instead of by a scan of everything due.  The caller commits: the queue
    manager runs its claim in the same batched transaction as the outcomes
    settled meanwhile.

    Two queue managers never take the same recipient: on SQLite the write
    transaction (BEGIN IMMEDIATE) excludes every other writer; on PostgreSQL
    the rows are locked and other queue managers skip them (SKIP LOCKED).
    """
    conn = connection_of(conn)
    if traces is None:
        take_over(conn, now)
        rows = conn.execute(_DUE, {"now": now, "limit": limit}).all()
    else:
        # The woken path: one message (or the few woken together), each by its id,
        # in short statements run on the driver's cursor (common/prepared.py).
        rows = []
        for trace in dict.fromkeys(traces):
            if len(rows) < limit:
                rows += _DUE_OF.rows(conn, {"now": now, "limit": limit - len(rows), "trace": trace})
    if not rows:
        return []
    token = secrets.token_hex(8)
    expires = now + dt.timedelta(seconds=lease)
    _MARK_ACTIVE.run(conn, [{"b_id": r.id, "owner": owner, "lease": token, "expires": expires} for r in rows])
    # Each claimed message's columns and delivery options, read with the claim
    # rather than before each delivery.
    messages = {m.id: m for mid in dict.fromkeys(r.message_id for r in rows)
                for m in _MESSAGE.rows(conn, {"id": mid})}
    jobs: dict[str, Job] = {}
    for r in rows:
        job = jobs.get(r.message_id)
        if job is None:
            m = messages[r.message_id]
            assert m.body is not None
            job = jobs[r.message_id] = Job(
                m.id, m.sender, m.body, m.received, m.warned, m.is_bounce, m.message_id, owner,
                asked=Asked(m.ret, m.envid, m.body_type, bool(m.smtputf8), bool(m.requiretls)),
                unfinished=m.unfinished, lease=token,
            )
        job.recipients.append(Claimed(r.id, r.address, r.original, r.attempts, r.notify, r.orcpt))
    return list(jobs.values())


# The claim's statements, built once: it runs for every batch of mail.
_CLAIMABLE = (
    select(Recipient.id, Recipient.message_id, Recipient.address, Recipient.attempts, Recipient.original,
           Recipient.notify, Recipient.orcpt)
    .join(Message)
    .where(Recipient.state == QUEUED, Recipient.next_attempt <= bindparam("now"), Message.held.is_(False))
)
_DUE = (
    _CLAIMABLE.order_by(Recipient.next_attempt).limit(bindparam("limit"))
    .with_for_update(of=Recipient, skip_locked=True)
)
_DUE_OF = Prepared(
    _CLAIMABLE.where(Recipient.message_id == bindparam("trace"))
    .order_by(Recipient.id).limit(bindparam("limit"))
    .with_for_update(of=Recipient, skip_locked=True)
)
_MARK_ACTIVE = Prepared(  # executemany, one row per recipient
    update(Recipient)
    .where(Recipient.id == bindparam("b_id"), Recipient.state == QUEUED)
    .values(state=ACTIVE, owner=bindparam("owner"), lease=bindparam("lease"), lease_expires=bindparam("expires"))
)
_UNFINISHED = (
    select(func.count())
    .where(Recipient.message_id == Message.id, Recipient.state.not_in(FINAL_STATES))
    .correlate(Message)
    .scalar_subquery()
)
_MESSAGE = Prepared(select(
    Message.id, Message.sender, Message.body, Message.received, Message.warned, Message.is_bounce,
    Message.message_id, Message.ret, Message.envid, Message.body_type, Message.smtputf8, Message.requiretls,
    _UNFINISHED.label("unfinished"),
).where(Message.id == bindparam("id")))


def take_over(conn: Connection, now: dt.datetime) -> int:
    """Put back in the queue every recipient whose lease expired (its holder died, froze,
    or lost the database): due now, the cut-short attempt counted (it may have reached
    the next hop, so the next one is a retry).  Returns how many.

    Rows another transaction holds (a settle in progress, a holder frozen inside its
    transaction) are skipped, never waited for: they are looked at again next time.
    """
    ids = conn.execute(_EXPIRED, {"now": now}).scalars().all()
    if not ids:
        return 0
    result = conn.execute(_PUT_BACK, {"ids": list(ids), "now": now})
    return int(getattr(result, "rowcount", 0) or 0)


def renew(conn: Connection, owner: str, now: dt.datetime, lease: float = LEASE) -> int:
    """Move on the expiry of every lease `owner` holds; returns how many.  A lease that
    another queue manager took over has another owner by then, and stays theirs."""
    result = conn.execute(_RENEW, {"b_owner": owner, "expires": now + dt.timedelta(seconds=lease)})
    return int(getattr(result, "rowcount", 0) or 0)


def still_held(conn: Connection, trace: str, ids: list[int], lease: str) -> set[int]:
    """Of message `trace`'s recipients `ids` claimed with token `lease`, those the claim
    still holds, locked until the caller's commit: a settle writes only these (fencing).
    The others were taken over (the lease expired) or finished by the operator meanwhile."""
    if not ids:
        return set()
    return set(_HELD.scalars(conn, {"trace": trace, "lease": lease})).intersection(ids)


# A claim with no expiry was made before claims were leases: expired too.
_EXPIRED = (
    select(Recipient.id)
    .where(Recipient.state == ACTIVE, or_(Recipient.lease_expires < bindparam("now"),
                                          Recipient.lease_expires.is_(None)))
    .with_for_update(skip_locked=True)
)
_PUT_BACK = (
    update(Recipient)
    .where(Recipient.id.in_(bindparam("ids", expanding=True)), Recipient.state == ACTIVE)
    .values(state=QUEUED, owner="", lease="", lease_expires=None, next_attempt=bindparam("now"),
            attempts=Recipient.attempts + 1)
)
_RENEW = (
    update(Recipient)
    .where(Recipient.owner == bindparam("b_owner"), Recipient.state == ACTIVE)
    .values(lease_expires=bindparam("expires"))
)
# By message (its index), not by a list of ids: a Prepared statement takes no IN list.
_HELD = Prepared(
    select(Recipient.id)
    .where(Recipient.message_id == bindparam("trace"), Recipient.state == ACTIVE,
           Recipient.lease == bindparam("lease"))
    .with_for_update()
)


def owner_id(host: str) -> str:
    """Who holds a claim: 'host:pid.start' (the start time tells a reused pid apart)."""
    return f"{host}:{os.getpid()}.{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    # Field 22 of /proc/PID/stat, after the parenthesised command name.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(process: str) -> bool:
    pid, _, start = process.partition(".")
    return pid.isdigit() and _start_time(int(pid)) == start != ""


def release_stale(session: Session, host: str) -> int:
    """Put back recipients that a queue manager of this host left active when it died.

    Only dead holders are released: another queue manager on this host that is
    still delivering keeps its claims.  The attempt the crash cut short counts:
    it may have reached the next hop, so the next one is a retry (and says so to
    our MDA, which then looks for an earlier copy a reader may have moved).
    """
    owners = session.scalars(
        select(Recipient.owner).where(Recipient.state == ACTIVE, Recipient.owner.like(host + ":%")).distinct()
    ).all()
    dead = [o for o in owners if not _alive(o.split(":", 1)[1])]
    if not dead:
        session.commit()
        return 0
    result = session.execute(
        update(Recipient)
        .where(Recipient.state == ACTIVE, Recipient.owner.in_(dead))
        .values(state=QUEUED, owner="", lease="", lease_expires=None, attempts=Recipient.attempts + 1)
    )
    session.commit()
    return int(getattr(result, "rowcount", 0) or 0)


def release_restored(session: Session) -> int:
    """In a database just restored from a backup no queue manager holds anything: every
    claim belongs to a process of the installation the backup was taken from, which may
    even still run on this host.  Put them all back, counting the cut attempt as
    `release_stale` does."""
    result = session.execute(
        update(Recipient).where(Recipient.state == ACTIVE)
        .values(state=QUEUED, owner="", lease="", lease_expires=None, attempts=Recipient.attempts + 1)
    )
    return int(getattr(result, "rowcount", 0) or 0)


# --- settle: the queue manager records what the next hop said -------------------------------------


@dataclass(frozen=True)
class Result:
    """The next hop's answer for one claimed recipient, as the settle reads it."""

    recipient: Claimed
    reply: Reply
    remote: str = ""  # the remote host that answered (never our MDA: it is no "Remote-MTA")
    local: bool = False  # handed to the MDA over LMTP
    dsn_passed: bool = False  # the next hop took NOTIFY/ORCPT: success is its to report
    mda_left_record: bool = False  # the MDA left its own event to us (XRECORD, common/lmtp_ext.py)
    mda_path: str = ""  # where the MDA stored the copy, when it left its event to us

    @property
    def mda_away(self) -> bool:
        """The hand-off to our MDA itself failed (X.4.x: no connection, or it was lost),
        as opposed to a temporary refusal the MDA gave (a full mailbox, a lock)."""
        return self.local and self.reply.is_temporary and self.reply.status.startswith("4.4.")

    @property
    def retry_soon(self) -> bool:
        """A local hand-off failed for a reason of our own host (X.4.x: the MDA away;
        X.3.x: a local error, a busy database, a full disk): retried on the short
        local schedule, not after the minutes a remote host is given."""
        return self.mda_away or (self.local and self.reply.is_temporary and self.reply.status.startswith("4.3."))


@dataclass(frozen=True)
class Settled:
    """One recipient's outcome, as `record_outcomes` writes it."""

    recipient_id: int
    address: str
    outcome: Outcome
    attempts: int
    reply: str
    detail: str
    next_attempt: dt.datetime | None = None  # deferred only
    # The MDA's own event (delivered / refused), when it asked us to record it.
    mda_event: EventName | None = None
    mda_detail: str = ""
    mda_path: str = ""


@dataclass
class Settlement:
    """What a settle leaves to do once committed: the notices it queued (trace ids) and its log lines."""

    notices: list[str] = field(default_factory=list)
    lines: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)


def settle(
    conn: Connection, job: Job, results: list[Result], *, now: dt.datetime, policy: Policy, hostname: str,
    local_domains: list[str], mda_back: bool = False,
) -> Settlement:
    """Record every outcome of `job`'s delivery round and queue the notices they call for.

    Each reply is classified (`classify`); the sender gets a bounce for the
    recipients that failed, a success notice for those that asked for one
    (and whose next hop will not send it), and once, when the message is
    older than `delay_warning`, a delay warning for those still waiting.
    `mda_back`: the
    MDA takes mail again after refusing it for a while, so the local mail
    waiting for it is due now.  Run inside the queue manager's shared relaxed
    batch.
    """
    done = Settlement()
    # Fencing: only what this claim still holds is ours to settle.  A recipient whose
    # lease expired while we worked (we froze, or lost the database) belongs to another
    # queue manager now: our result is dropped, no state, event or notice written.
    held = still_held(conn, job.trace, [r.recipient.id for r in results], job.lease)
    lost = [r for r in results if r.recipient.id not in held]
    if lost:
        results = [r for r in results if r.recipient.id in held]
        done.lines.append(("lease lost on %d recipients (%s): another queue manager has them, our results "
                           "are dropped", (len(lost), ", ".join(f"<{r.recipient.address}>" for r in lost))))
        if not results:
            return done
    if mda_back:
        moved = bring_forward(conn, local_domains, now)
        if moved:
            done.lines.append(("the MDA takes mail again: %d waiting local recipients are due now", (moved,)))
    age = (now - job.received).total_seconds()
    failures: list[bounce.Failure] = []
    delayed: list[bounce.Failure] = []
    succeeded: list[bounce.Failure] = []
    deferred = False
    settled: list[Settled] = []
    for res in results:
        rcpt = res.recipient
        reply, n = res.reply, rcpt.attempts + 1
        outcome, wait = classify(reply, age, n, policy, mda_away=res.retry_soon, warned=job.warned)
        text = str(reply)
        # The MDA's answer, which it left to us to record (XRECORD): its hop in
        # the trace, with the mailbox path its 250 carried.
        mda_event: EventName | None = None
        if res.mda_left_record and not res.mda_away:
            mda_event = EventName.DELIVERED if reply.is_ok else EventName.REFUSED
        detail = text + (f" (via {res.remote})" if res.remote else "")
        settled.append(Settled(
            rcpt.id, rcpt.address, outcome, n, text, detail,
            next_attempt=now + dt.timedelta(seconds=wait) if outcome is Outcome.DEFERRED else None,
            mda_event=mda_event, mda_detail=text, mda_path=res.mda_path,
        ))
        done.lines.append(("%s to=<%s> attempts=%d: %s", (outcome, rcpt.address, n, detail)))
        # RFC 3461 4.1: only the notices the recipient asked for (NOTIFY).
        failure = bounce.Failure(rcpt.address, rcpt.original, reply, res.remote, orcpt=rcpt.orcpt)
        if outcome in (Outcome.BOUNCED, Outcome.EXPIRED):
            if dsn.wants(rcpt.notify, "FAILURE"):
                failures.append(failure)
        elif outcome is Outcome.DEFERRED:
            deferred = True
            if dsn.wants(rcpt.notify, "DELAY"):
                delayed.append(failure)
        elif dsn.wants(rcpt.notify, "SUCCESS") and not res.dsn_passed:
            # RFC 3461 5.2.2: delivered by us, or relayed to a hop that cannot tell.
            action = "delivered" if res.local else "relayed"
            succeeded.append(dataclasses.replace(failure, action=action))
    record_outcomes(conn, job.trace, settled, now)
    may_notify = job.sender != "" and not job.is_bounce
    local_sender = domain_of(job.sender) in local_domains
    if failures and may_notify:
        _notify(conn, done, job, failures, now, hostname, local_sender)
    if succeeded and may_notify:
        _notify(conn, done, job, succeeded, now, hostname, local_sender, success=True)
    warn = policy.delay_warning
    if deferred and not job.warned and warn > 0 and age >= warn:
        if delayed and may_notify:
            _notify(conn, done, job, delayed, now, hostname, local_sender, delayed=True)
        conn.execute(_WARNED, {"trace": job.trace})
    if not deferred:  # a deferred recipient is still queued: the body must stay
        # Every recipient left was in this job and is final now: no need to read them.
        drop_body_if_done(conn, job.trace, all_final=job.unfinished == len(job.recipients) and not lost)
    return done


def _notify(
    conn: Connection, done: Settlement, job: Job, failures: list[bounce.Failure], now: dt.datetime,
    hostname: str, local_sender: bool, *, delayed: bool = False, success: bool = False,
) -> None:
    asked = job.asked
    notice = enqueue_dsn(
        conn, hostname=hostname, trace=job.trace, sender=job.sender, original=job.body,
        received=job.received, failures=failures, now=now, delayed=delayed,
        success=success, envid=asked.envid, ret=asked.ret,
        # To a local sender the notice's one hop is our MDA (BINARYMIME, on this host).
        body_type=asked.body_type, requiretls=asked.requiretls, local=local_sender,
    )
    kind = "success notice" if success else "delay warning" if delayed else "bounce"
    done.lines.append(("%s to=<%s> queued as %s", (kind, job.sender, notice)))
    done.notices.append(notice)


def record_outcomes(conn: Connection, trace: str, settled: list[Settled], now: dt.datetime) -> None:
    """Every recipient's new state and the hops' events, a few executemany statements.

    Core statements on the tables, prepared once: this runs for every message.
    """
    done = [_settle_row(x) for x in settled if x.next_attempt is None]
    deferred = [{**_settle_row(x), "b_next": x.next_attempt} for x in settled if x.next_attempt is not None]
    if done:
        _SETTLE.run(conn, done)
    if deferred:
        _DEFER.run(conn, deferred)
    events: list[dict[str, object]] = []
    for x in settled:
        if x.mda_event:
            events.append(event_row(trace, Hop.MDA, x.mda_event, recipient=x.address, detail=x.mda_detail,
                                    path=x.mda_path, time=now))
        events.append(event_row(trace, Hop.QMGR, EventName(x.outcome), recipient=x.address, detail=x.detail, time=now))
    if events:
        add_events(conn, events)


def _settle_row(x: Settled) -> dict[str, object]:
    return {"b_id": x.recipient_id, "b_state": STATE_AFTER[x.outcome], "b_attempts": x.attempts, "b_reply": x.reply}


# Executemany on the driver's cursor (common/prepared.py).
_SETTLE_SQL = (
    update(Recipient)
    .where(Recipient.id == bindparam("b_id"))
    .values(state=bindparam("b_state"), attempts=bindparam("b_attempts"), last_reply=bindparam("b_reply"), owner="",
            lease="", lease_expires=None)
)
_SETTLE = Prepared(_SETTLE_SQL)
_DEFER = Prepared(_SETTLE_SQL.values(next_attempt=bindparam("b_next")))
_WARNED = update(Message).where(Message.id == bindparam("trace")).values(warned=True)


def enqueue_dsn(
    conn: Connection | Session,
    *,
    hostname: str,
    trace: str,
    sender: str,
    original: bytes,
    received: dt.datetime,
    failures: list[bounce.Failure],
    now: dt.datetime,
    delayed: bool = False,
    hop: Hop = Hop.QMGR,
    success: bool = False,
    envid: str = "",
    ret: str = "",
    body_type: str = "7BIT",
    requiretls: bool = False,
    local: bool = False,
) -> str:
    """Queue a bounce, delay warning or success notice for message `trace` to `sender`; returns its trace id.

    `body_type` and `requiretls` are the original's; `local`: `sender` is in our
    own domains (bounce.returned says what each changes)."""
    dsn_trace = new_trace_id()
    body = bounce.compose(
        hostname=hostname, sender=sender, trace=trace, original=original,
        failures=failures, arrival=received, now=now, delayed=delayed, success=success, envid=envid, ret=ret,
        body_type=body_type, requiretls=requiretls, local=local,
    )
    form = bounce.returned(ret=ret, body_type=body_type, requiretls=requiretls, local=local)
    conn = connection_of(conn)
    enqueue(
        conn, trace=dsn_trace, sender="", body=body, now=now, hop=hop, is_bounce=True,
        recipients=[QueuedRecipient(sender, sender)],
        options={
            # A returned 8-bit message (RET=FULL) makes the notice 8-bit too; a returned binary one, binary.
            "body_type": "BINARYMIME" if form is bounce.Returned.FULL and body_type == "BINARYMIME"
            else "7BIT" if body.isascii() else "8BITMIME",
            # The header of a REQUIRETLS message goes on only with REQUIRETLS (RFC 8689 5).
            "requiretls": requiretls and form is not bounce.Returned.REDACTED,
        },
    )
    kind = "success notice" if success else "delay warning" if delayed else "bounce"
    add_event(conn, trace, hop, EventName.DSN, detail=f"{kind} to <{sender}> as {dsn_trace}", time=now)
    return dsn_trace


def bring_forward(conn: Connection, domains: list[str], now: dt.datetime) -> int:
    """Make every waiting recipient in one of our own `domains` due now; returns how many.

    Called when the MDA takes mail again after refusing it for a while, so the
    mail that waited for it does not wait out the rest of its retry interval.
    """
    result = conn.execute(
        update(Recipient)
        .where(
            Recipient.state == QUEUED, Recipient.next_attempt > now,
            or_(*(Recipient.address.like(f"%@{d}") for d in domains)),
        )
        .values(next_attempt=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def drop_body_if_done(conn: Connection | Session, trace: str, *, all_final: bool = False) -> bool:
    """Once every recipient is final the queued copy is no longer needed.

    all_final: the caller knows they all are (it has just settled every
    recipient that was left, `Job.unfinished`), so they are not read again.
    """
    # A plain read, then the update.  An UPDATE ... WHERE NOT EXISTS was tried
    # and was slower (py-spy: 14 % -> 29 % of the queue manager's samples):
    # recipients.message_id had no index then, so each EXISTS scanned the table.
    conn = connection_of(conn)
    if all_final:
        _DROP_BODY.run(conn, {"trace": trace})
        return True
    states = _STATES.scalars(conn, {"trace": trace})
    if states and all(s in FINAL_STATES for s in states):
        _DROP_BODY.run(conn, {"trace": trace})
        return True
    return False


_STATES = Prepared(select(Recipient.state).where(Recipient.message_id == bindparam("trace")))
_DROP_BODY = Prepared(update(Message).where(Message.id == bindparam("trace")).values(body=None))


# The operator's actions (`mailroom queue`, Postfix's postsuper): each changes
# queue state in the caller's transaction and returns how many recipients or
# messages it touched; the caller commits and wakes the queue manager.


def make_due(session: Session, trace: str | None, now: dt.datetime) -> int:
    """Flush: make the waiting recipients (of one message, or all) due now.
    A held message's are left as they are: it waits for its release."""
    q = update(Recipient).where(
        Recipient.state == QUEUED, Recipient.message_id.not_in(select(Message.id).where(Message.held.is_(True)))
    )
    if trace:
        q = q.where(Recipient.message_id == trace)
    return int(getattr(session.execute(q.values(next_attempt=now)), "rowcount", 0) or 0)


def held_state(session: Session, trace: str) -> bool | None:
    """Whether a message in the queue is held; None when it is not in the queue
    (unknown, or every recipient already has its final outcome)."""
    if not _unfinished(session, trace):
        return None
    return bool(session.scalar(select(Message.held).where(Message.id == trace)))


def held_count(session: Session) -> int:
    """Messages in the queue that are held."""
    waiting = select(Recipient.message_id).where(Recipient.state.not_in(FINAL_STATES))
    return int(session.scalar(select(func.count()).where(Message.held.is_(True), Message.id.in_(waiting))) or 0)


def hold(session: Session, trace: str, held: bool) -> bool:
    """Hold a message that still has recipients to deliver (or release it).

    False, and nothing recorded, when it is not in the queue or is already so."""
    if held_state(session, trace) in (None, held):
        return False
    session.execute(update(Message).where(Message.id == trace).values(held=held))
    add_event(session, trace, Hop.ADMIN, EventName.HELD if held else EventName.RELEASED)
    return True


def unfinished_count(session: Session, trace: str) -> int:
    """How many of a message's recipients are still waiting for their outcome."""
    q = select(func.count()).where(Recipient.message_id == trace, Recipient.state.not_in(FINAL_STATES))
    return int(session.scalar(q) or 0)


def delete(session: Session, trace: str) -> int:
    """Drop a message's unfinished recipients without telling anyone (postsuper -d)."""
    n = _finish(session, trace, DELETED)
    if n:
        add_event(session, trace, Hop.ADMIN, EventName.DELETED, detail="deleted by the administrator")
        drop_body_if_done(session, trace)
    return n


def return_to_sender(session: Session, trace: str, *, hostname: str, now: dt.datetime) -> int:
    """Bounce a message's unfinished recipients now, with a DSN to its sender."""
    reply = R.RETURNED_BY_ADMIN
    msg = session.get(Message, trace)
    if msg is None or msg.body is None:
        return 0
    failures = [bounce.Failure(r.address, r.original, reply) for r in msg.recipients if r.state not in FINAL_STATES]
    n = _finish(session, trace, BOUNCED, str(reply))
    if failures and msg.sender and not msg.is_bounce:
        enqueue_dsn(
            session, hostname=hostname, trace=trace, sender=msg.sender, original=msg.body,
            received=msg.received, failures=failures, now=now, hop=Hop.ADMIN,
            body_type=msg.body_type, requiretls=bool(msg.requiretls),
        )
    drop_body_if_done(session, trace)
    return n


def _unfinished(session: Session, trace: str) -> bool:
    q = select(Recipient.id).where(Recipient.message_id == trace, Recipient.state.not_in(FINAL_STATES)).limit(1)
    return session.execute(q).first() is not None


def _finish(session: Session, trace: str, state: str, reply: str = "") -> int:
    values: dict[str, object] = {"state": state, "owner": "", "lease": "", "lease_expires": None}
    if reply:
        values["last_reply"] = reply
    result = session.execute(
        update(Recipient)
        .where(Recipient.message_id == trace, Recipient.state.not_in(FINAL_STATES))
        .values(**values)
    )
    return int(getattr(result, "rowcount", 0) or 0)
