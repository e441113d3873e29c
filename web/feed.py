"""The web program's one reader of the events table, shared by the live page and /metrics.

It reads new rows in id order (with SQLite's single writer, id order is commit
order), counts them into the metrics, keeps the last few hundred for pages that
open later, and pushes each to every live page that is listening (Server-Sent
Events).  A snapshot of the queue goes out with them when anything happened, and
every few seconds anyway, so "next attempt" counts down on an idle system too.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections import deque
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from common.db import Database
from common.events import EventName, Hop
from common.models import ACTIVE, QUEUED, Event, Message, Recipient, utcnow
from web.metrics import Metrics

log = logging.getLogger("web.feed")

BATCH = 5000  # rows read per query
RECENT = 400  # events a newly opened page starts with
QUEUE_ROWS = 200  # recipients shown in the queue table
POLL = 0.2  # seconds between looks at the table while nothing happens
SNAPSHOT_EVERY = 5.0  # seconds between queue snapshots while nothing happens
MAX_LISTENERS = 64  # open live pages; more are refused (503) rather than slowing everyone
LISTENER_BACKLOG = 2000  # messages waiting for one slow page before it is dropped


def _iso(t: dt.datetime | None) -> str:
    return t.isoformat(timespec="milliseconds") + "Z" if t is not None else ""


def event_row(e: Event) -> dict[str, Any]:
    return {
        "id": e.id, "trace": e.trace_id, "hop": e.hop, "event": e.event, "when": e.time,
        "recipient": e.recipient, "detail": e.detail, "path": e.path,
    }


# The tail reads columns, not ORM objects: it sees every event of every message,
# and building an Event object per row cost more than the query.
_ROW_KEYS = ("id", "trace", "hop", "event", "when", "recipient", "detail", "path")
_COLUMNS = (Event.id, Event.trace_id, Event.hop, Event.event, Event.time, Event.recipient, Event.detail, Event.path)


def public(row: dict[str, Any]) -> dict[str, Any]:
    """An event as the page receives it (JSON: the time as text)."""
    out = {k: v for k, v in row.items() if k != "when"}
    out["time"] = _iso(row["when"])
    return out


def queue_snapshot(db: Database) -> dict[str, Any]:
    """The recipients still in the queue, oldest message first, with their last reply."""
    with db.read() as s:
        rows = s.execute(
            select(
                Recipient.message_id, Message.sender, Recipient.address, Recipient.state, Recipient.attempts,
                Recipient.next_attempt, Recipient.last_reply, Message.received, Message.held,
            )
            .join(Message, Message.id == Recipient.message_id)
            .where(Recipient.state.in_((QUEUED, ACTIVE)))
            .order_by(Message.received, Recipient.id)
            .limit(QUEUE_ROWS)
        ).all()
    return {
        "now": _iso(utcnow()),
        "recipients": [
            {"trace": r[0], "sender": r[1], "recipient": r[2], "state": r[3], "attempts": r[4],
             "next_attempt": _iso(r[5]), "last_reply": r[6], "received": _iso(r[7]), "held": r[8]}
            for r in rows
        ],
    }


def sse(kind: str, data: object) -> bytes:
    """One Server-Sent Events message (JSON has no raw newlines, so one data line)."""
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


class Feed:
    def __init__(self, db: Database, metrics: Metrics) -> None:
        self.db = db
        self.metrics = metrics
        self.last_id = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.listeners: set[asyncio.Queue[bytes | None]] = set()
        self.snapshot: dict[str, Any] = {"now": "", "recipients": []}
        self._lock = threading.Lock()
        self._unsent: list[dict[str, Any]] = []

    def catch_up(self) -> int:
        """Read every row not read yet (blocking; from a thread).  Returns how many.
        /metrics calls it too, so a scrape counts everything committed before it."""
        total = 0
        with self._lock:
            while True:
                with self.db.read() as s:
                    found = s.execute(
                        select(*_COLUMNS).where(Event.id > self.last_id).order_by(Event.id).limit(BATCH)
                    )
                    rows: list[dict[str, Any]] = [dict(zip(_ROW_KEYS, r, strict=True)) for r in found]
                if not rows:
                    return total
                self._add_recipients(rows)
                self.metrics.observe(rows)
                self.last_id = rows[-1]["id"]
                self.recent.extend(rows)
                self._unsent.extend(rows[-RECENT:])
                del self._unsent[:-RECENT]
                total += len(rows)

    def _add_recipients(self, rows: list[dict[str, Any]]) -> None:
        """Give each `queued` event the message's recipients: the page names them all from
        the start, not only those with an outcome yet (a slow remote host may take minutes,
        and a message's outcomes are recorded together)."""
        queued = [r for r in rows if r["event"] == EventName.QUEUED and r["hop"] == Hop.MTA]
        by_trace: dict[str, list[str]] = {}
        for start in range(0, len(queued), 500):  # SQLite's limit on bound parameters
            traces = [r["trace"] for r in queued[start:start + 500]]
            with self.db.read() as s:
                for trace, address in s.execute(select(Recipient.message_id, Recipient.address)
                                                .where(Recipient.message_id.in_(traces)).order_by(Recipient.id)):
                    by_trace.setdefault(trace, []).append(address)
        for r in queued:
            r["recipients"] = by_trace.get(r["trace"], [])

    def _take_unsent(self) -> list[dict[str, Any]]:
        with self._lock:
            rows, self._unsent = self._unsent, []
            return rows

    def refresh(self) -> None:
        self.snapshot = queue_snapshot(self.db)

    def hello(self) -> bytes:
        """What a page gets first: the recent events and the queue."""
        with self._lock:
            recent = [public(r) for r in self.recent]
        return sse("hello", {"events": recent, "queue": self.snapshot})

    def listen(self) -> asyncio.Queue[bytes | None] | None:
        if len(self.listeners) >= MAX_LISTENERS:
            return None
        q: asyncio.Queue[bytes | None] = asyncio.Queue(LISTENER_BACKLOG)
        self.listeners.add(q)
        return q

    def leave(self, q: asyncio.Queue[bytes | None]) -> None:
        self.listeners.discard(q)

    def _broadcast(self, message: bytes | None) -> None:
        for q in list(self.listeners):
            try:
                q.put_nowait(message)
            except asyncio.QueueFull:
                # A page that does not read is dropped; it reconnects and starts afresh.
                self.listeners.discard(q)
                with contextlib.suppress(asyncio.QueueFull):
                    q.get_nowait()
                    q.put_nowait(None)

    async def run(self, stop: asyncio.Event) -> None:
        """Tail the table until `stop` is set, then end every page's stream."""
        first = True
        last_snapshot = 0.0
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.catch_up)
                rows = self._take_unsent()
                if first:
                    rows, first = [], False  # the history is in `recent`, for hello()
                now = time.monotonic()
                # The snapshot (a join over the queue) is only for open pages:
                # under load nobody may be watching, and it would run 5 times a second.
                if self.listeners and (rows or now - last_snapshot >= SNAPSHOT_EVERY):
                    await asyncio.to_thread(self.refresh)
                    last_snapshot = now
                    if rows:
                        self._broadcast(sse("events", [public(r) for r in rows]))
                    self._broadcast(sse("queue", self.snapshot))
            except SQLAlchemyError as exc:
                # No schema yet (the daemons create it), or the database is busy: try again.
                log.warning("cannot read the database: %s", exc.__class__.__name__)
                await asyncio.sleep(2.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL)
        self._broadcast(None)
