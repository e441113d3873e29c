"""The shared database: what every process knows about every message.

One row per message (its body too, while it is queued), one row per recipient
with its own delivery state, and one `events` row per thing that happened to it
at any hop.  `mailroom trace` is just a query over `events`.  Users, aliases and
domains live here too, so the MSA, MTA and MDA agree on who exists.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    Boolean,
    Connection,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from common import clock
from common.events import EventName, Hop
from common.prepared import Prepared, insert_all


def utcnow() -> dt.datetime:
    return clock.process_now()  # naive UTC; lab time in a lab (common/clock.py)


class Base(DeclarativeBase):
    pass


class Domain(Base):
    __tablename__ = "domains"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)  # lower-case
    password_hash: Mapped[str] = mapped_column(String(200), default="")
    store: Mapped[str] = mapped_column(String(10), default="maildir")  # maildir | mbox
    # Relative to the mail root; chosen by `mailroom user add`, never derived
    # from an address at delivery time.
    mailbox: Mapped[str] = mapped_column(String(255))
    quota: Mapped[int] = mapped_column(Integer, default=0)  # bytes, 0 = unlimited
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Alias(Base):
    __tablename__ = "aliases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(320), index=True)  # addr or "@domain"
    target: Mapped[str] = mapped_column(String(320))


class DirectoryGeneration(Base):
    """One row whose value moves (by trigger) whenever users or aliases change:
    the daemons' in-memory copies of those tables reload when it moved."""

    __tablename__ = "directory_generation"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class VacationReply(Base):
    """The vacation memory (RFC 5230 4.2): when `user` last answered `sender` for the
    vacation action `handle`, so that a sender hears it at most once per :days."""

    __tablename__ = "vacation_replies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(320))
    sender: Mapped[str] = mapped_column(String(320))  # lower-case
    handle: Mapped[str] = mapped_column(String(64))
    sent: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("user", "sender", "handle", name="uq_vacation_replies"),)


class SieveSend(Base):
    """One message a user's Sieve script sent (a redirect, a vacation reply): counted
    against the user's hourly sending limit, as their submissions are; an hour's worth kept."""

    __tablename__ = "sieve_sends"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(320))
    time: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(12))  # redirect | vacation

    __table_args__ = (Index("ix_sieve_sends_user_time", "user", "time"),)


class Admin(Base):
    """An account of the admin page (`mailroom admin add NAME`); not a mail user."""

    __tablename__ = "admins"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))  # argon2id
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class DMARCVerdict(Base):
    """The DMARC verdict on one message from the Internet, kept until the day's aggregate
    report (RFC 7489 7.2) to its From: domain has gone out (mta/auth/dmarcreport.py)."""

    __tablename__ = "dmarc_verdicts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    source_ip: Mapped[str] = mapped_column(String(45))
    header_from: Mapped[str] = mapped_column(String(255), index=True)
    envelope_from: Mapped[str] = mapped_column(String(255), default="")  # the domain
    spf_domain: Mapped[str] = mapped_column(String(255), default="")
    spf_result: Mapped[str] = mapped_column(String(12), default="none")
    dkim: Mapped[str] = mapped_column(Text, default="[]")  # JSON: [[domain, selector, result], ...]
    result: Mapped[str] = mapped_column(String(12))  # pass, fail, none, temperror, permerror
    disposition: Mapped[str] = mapped_column(String(12), default="none")  # none, quarantine, reject
    reason: Mapped[str] = mapped_column(String(32), default="")  # sampled_out (pct), local_policy
    # The published record that applied (empty when none was found).
    policy_domain: Mapped[str] = mapped_column(String(255), default="")
    record: Mapped[str] = mapped_column(Text, default="")


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the trace id
    message_id: Mapped[str] = mapped_column(String(998), default="", index=True)
    sender: Mapped[str] = mapped_column(String(320), default="")  # "" is <>
    size: Mapped[int] = mapped_column(Integer, default=0)
    # The queued copy; dropped once every recipient reached a final state.
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    received: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    client: Mapped[str] = mapped_column(String(300), default="")
    held: Mapped[bool] = mapped_column(Boolean, default=False)
    warned: Mapped[bool] = mapped_column(Boolean, default=False)  # delay DSN sent
    is_bounce: Mapped[bool] = mapped_column(Boolean, default=False)
    # sha256 of the message as its sender wrote it (Received fields left out):
    # with Message-ID, sender and recipients it recognises a resubmission.
    digest: Mapped[str] = mapped_column(String(64), default="")
    # What the sender asked for at MAIL FROM, kept for the next hop and the DSNs:
    # RET (FULL | HDRS | "") and ENVID (RFC 3461), BODY=8BITMIME (RFC 6152),
    # SMTPUTF8 (RFC 6531), REQUIRETLS (RFC 8689).
    ret: Mapped[str] = mapped_column(String(4), default="")
    envid: Mapped[str] = mapped_column(String(100), default="")
    body_type: Mapped[str] = mapped_column(String(10), default="7BIT")
    smtputf8: Mapped[bool] = mapped_column(Boolean, default=False)
    requiretls: Mapped[bool] = mapped_column(Boolean, default=False)
    recipients: Mapped[list[Recipient]] = relationship(
        back_populates="message", cascade="all, delete-orphan", order_by="Recipient.id"
    )


# Recipient states.  queued -> active -> delivered | bounced | expired | queued (deferred)
QUEUED = "queued"
ACTIVE = "active"
DELIVERED = "delivered"
BOUNCED = "bounced"
EXPIRED = "expired"
DELETED = "deleted"
FINAL_STATES = (DELIVERED, BOUNCED, EXPIRED, DELETED)


class Recipient(Base):
    __tablename__ = "recipients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(320))
    original: Mapped[str] = mapped_column(String(320), default="")  # before alias expansion
    state: Mapped[str] = mapped_column(String(12), default=QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_reply: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str] = mapped_column(String(100), default="")  # qmgr holding it (active): "node:pid.start"
    # The claim is a lease: `lease` is its token (new at every claim; a settle
    # must show it, so a holder that lost the claim cannot settle), valid until
    # `lease_expires`, which the holder moves on while it works.  After that
    # any queue manager takes the recipient over.
    lease: Mapped[str] = mapped_column(String(32), default="", server_default="")
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # RFC 3461 at RCPT: NOTIFY ("" = the default: failures and delays) and
    # ORCPT as "addr-type;address" ("" = not given).
    notify: Mapped[str] = mapped_column(String(24), default="")
    orcpt: Mapped[str] = mapped_column(String(500), default="")
    message: Mapped[Message] = relationship(back_populates="recipients")

    __table_args__ = (
        Index("ix_recipients_due", "state", "next_attempt"),
        # Every settle and `mailroom queue` looks recipients up by message.
        Index("ix_recipients_message_id", "message_id"),
    )


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trace_id: Mapped[str] = mapped_column(String(32), index=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=False), default=utcnow)
    hop: Mapped[str] = mapped_column(String(8))  # a common.events.Hop
    event: Mapped[str] = mapped_column(String(16))  # a common.events.EventName
    recipient: Mapped[str] = mapped_column(String(320), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    path: Mapped[str] = mapped_column(Text, default="")


class Node(Base):
    """One row per node sharing the database (docs/cluster.md): its roles, and the
    last time one of its daemons said it was alive (every third of `[queue] lease`)."""

    __tablename__ = "nodes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    roles: Mapped[str] = mapped_column(String(200), default="")  # space-separated, as [mailroom] roles
    heartbeat: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class TLSResult(Base):
    """Outbound TLS sessions counted for TLS-RPT (RFC 8460; mta/tlsrpt.py), kept
    until the day's report to the recipient domain is queued."""

    __tablename__ = "tls_results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[str] = mapped_column(String(10), index=True)  # UTC, YYYY-MM-DD
    policy_domain: Mapped[str] = mapped_column(String(255))
    policy_type: Mapped[str] = mapped_column(String(16))  # sts | tlsa | no-policy-found
    policy_string: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of strings
    mx_host: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of strings
    result: Mapped[str] = mapped_column(String(32), default="")  # "" success, else the RFC 8460 result type
    receiving_mx: Mapped[str] = mapped_column(String(255), default="")
    receiving_ip: Mapped[str] = mapped_column(String(64), default="")
    sending_ip: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    count: Mapped[int] = mapped_column(Integer, default=0)


def add_event(
    conn: Connection | Session,
    trace_id: str,
    hop: Hop,
    event: EventName,
    *,
    recipient: str = "",
    detail: str = "",
    path: str = "",
    time: dt.datetime | None = None,
) -> None:
    # A plain Core INSERT, run at once: cheaper than an ORM object waiting for
    # the flush, or the ORM's bulk-insert path.  The per-message paths (group
    # commit) pass a Connection; the operator's commands and tests a Session.
    add_events(conn, [event_row(trace_id, hop, event, recipient=recipient, detail=detail, path=path, time=time)])


def event_row(
    trace_id: str, hop: Hop, event: EventName, *, recipient: str = "", detail: str = "", path: str = "",
    time: dt.datetime | None = None,
) -> dict[str, object]:
    """One event, as `add_events` inserts it."""
    return {"trace_id": trace_id, "hop": hop, "event": event, "recipient": recipient, "detail": detail,
            "path": path, "time": time or utcnow()}


def add_events(conn: Connection | Session, rows: list[dict[str, object]]) -> None:
    """Several events in one statement, in order (executemany): a statement costs the
    MTA about a tenth of a millisecond per message, on the path its 250 waits for."""
    if isinstance(conn, Session):
        conn = conn.connection()
    _INSERT_EVENT.run(conn, rows)


# On the driver's cursor (common/prepared.py): this runs for every message at every hop.
_INSERT_EVENT = Prepared(insert_all(Event, leave_out=("id",)))
