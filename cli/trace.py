"""`mailroom trace ID`: one message's journey, hop by hop, from the events table.

`mailroom trace --follow [ID]` keeps reading the table and prints each hop as it
is recorded: one message's, or (without an ID) every message's.  Following one
message ends by itself once every recipient has its final outcome (delivered,
bounced, expired, deleted), and a second later, for the last lines: the MSA
records its part after the MTA's 250, so it may come after a fast delivery.
An ID nothing is known of is waited for FOLLOW_GRACE seconds (the message may
still be on its way in: its id is in the MSA's log from MAIL FROM on, in the
queue only once the MTA has it), then reported unknown.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from cli.show import clean
from common.db import Database
from common.models import FINAL_STATES, Event, Message, Recipient

FOLLOW_GRACE = 10.0  # seconds an unknown ID is waited for before it is called unknown
SETTLE = 1.0  # seconds of lines still read after the final outcome


class UnknownMessage(LookupError):
    """`trace --follow ID` for an ID that named nothing within the grace period."""


def _resolve(s: Session, ident: str) -> tuple[Message | None, str]:
    """The message a trace id or a Message-ID (with or without angle brackets) names, and its trace id."""
    mid = ident if ident.startswith("<") else f"<{ident}>"
    msg = s.scalars(select(Message).where(or_(Message.id == ident.upper(), Message.message_id == mid))).first()
    return msg, msg.id if msg else ident.upper()


def find(db: Database, ident: str) -> dict[str, Any] | None:
    """By trace id, or by Message-ID (with or without the angle brackets)."""
    with db.read() as s:
        msg, trace = _resolve(s, ident)
        events = s.scalars(select(Event).where(Event.trace_id == trace).order_by(Event.time, Event.id)).all()
        if msg is None and not events:
            return None
        return {
            "id": trace,
            "message_id": msg.message_id if msg else "",
            "sender": msg.sender if msg else "",
            "events": [
                {
                    "hop": e.hop,
                    "event": e.event,
                    "time": e.time.isoformat(timespec="microseconds"),
                    "recipient": e.recipient,
                    "detail": e.detail,
                    "path": e.path,
                }
                for e in events
            ],
        }


def render_text(trace: dict[str, Any]) -> str:
    """A timeline with the time spent since the first event and since the previous one."""
    lines = [
        f"trace {clean(trace['id'])}  message-id {clean(trace['message_id'] or '-')}  from <{clean(trace['sender'])}>"
    ]
    first = prev = None
    for e in trace["events"]:
        t = dt.datetime.fromisoformat(e["time"])
        first = first or t
        since = (t - first).total_seconds() * 1000
        step = (t - prev).total_seconds() * 1000 if prev else 0.0
        prev = t
        who = f" <{clean(e['recipient'])}>" if e["recipient"] else ""
        lines.append(
            f"{e['time'][11:]}  +{since:9.1f} ms ({step:+8.1f})  {clean(e['hop']):<4} {clean(e['event']):<9}{who}"
        )
        if e["detail"]:
            lines.append(f"{'':>44}{clean(e['detail'])}")
        if e["path"]:
            lines.append(f"{'':>44}-> {clean(e['path'])}")
    return "\n".join(lines)


def to_json(trace: dict[str, Any]) -> str:
    return json.dumps(trace, indent=2)


def _event_dict(e: Event) -> dict[str, Any]:
    return {
        "id": e.id, "trace": e.trace_id, "hop": e.hop, "event": e.event,
        "time": e.time.isoformat(timespec="microseconds"),
        "recipient": e.recipient, "detail": e.detail, "path": e.path,
    }


def follow(
    db: Database, ident: str | None, *, poll: float = 0.2, stop: Callable[[], bool] = lambda: False,
    grace: float = FOLLOW_GRACE, settle: float = SETTLE,
) -> Iterator[dict[str, Any]]:
    """Every event of one trace (by trace id or Message-ID), or of all traces when
    `ident` is None: first those already recorded, then each new one as it is
    committed.  Rows are read in id order, which is commit order with SQLite's
    single writer.  The starting point is read before this returns.

    One trace ends `settle` seconds after every recipient has its final outcome;
    an ident that names nothing for `grace` seconds raises UnknownMessage."""
    if ident is not None:
        return _follow_one(db, ident, poll, stop, grace, settle)
    # Everyone's mail: only what happens from now on.
    with db.read() as s:
        last = s.scalar(select(func.max(Event.id))) or 0
    return _tail(db, None, last, poll, stop)


def _follow_one(
    db: Database, ident: str, poll: float, stop: Callable[[], bool], grace: float, settle: float
) -> Iterator[dict[str, Any]]:
    started = time.monotonic()
    trace, found, last = ident.upper(), False, 0
    final_at: float | None = None
    while not stop():
        # One read transaction: the outcomes and the events are of the same moment,
        # so no event committed with a final outcome can be missed.
        with db.read() as s:
            msg, trace = _resolve(s, ident) if not found else (s.get(Message, trace), trace)
            states = s.scalars(select(Recipient.state).where(Recipient.message_id == trace)).all()
            q = select(Event).where(Event.trace_id == trace, Event.id > last).order_by(Event.id).limit(500)
            rows = [_event_dict(e) for e in s.scalars(q)]
        found = found or msg is not None
        for row in rows:
            last = row["id"]
            yield row
        now = time.monotonic()
        waited = now - started >= grace
        if not found and not last and waited:
            raise UnknownMessage(ident)
        if (found and states and all(st in FINAL_STATES for st in states)) or (not found and waited):
            # Finished; or only events and no message after the grace (a resubmission,
            # answered with the first message's id, queues nothing of its own).
            final_at = final_at if final_at is not None else now
            if now - final_at >= settle and not rows:
                return
        if not rows:
            time.sleep(poll)


def outcomes(db: Database, ident: str) -> list[tuple[str, str]]:
    """(recipient, state) of each of a message's recipients."""
    with db.read() as s:
        _, trace = _resolve(s, ident)
        return [(r.address, r.state) for r in
                s.scalars(select(Recipient).where(Recipient.message_id == trace).order_by(Recipient.id))]


def _tail(
    db: Database, trace: str | None, last: int, poll: float, stop: Callable[[], bool]
) -> Iterator[dict[str, Any]]:
    while not stop():
        with db.read() as s:
            q = select(Event).where(Event.id > last)
            if trace is not None:
                q = q.where(Event.trace_id == trace)
            rows = [_event_dict(e) for e in s.scalars(q.order_by(Event.id).limit(500))]
        for row in rows:
            last = row["id"]
            yield row
        if not rows:
            time.sleep(poll)


def render_line(e: dict[str, Any], *, with_trace: bool) -> str:
    """One event as one line, as `trace --follow` prints it."""
    who = f" <{clean(e['recipient'])}>" if e["recipient"] else ""
    head = f"{clean(e['trace'])} " if with_trace else ""
    line = f"{e['time'][11:]}  {head}{clean(e['hop']):<4} {clean(e['event']):<9}{who}"
    if e["detail"]:
        line += f"  {clean(e['detail'])}"
    if e["path"]:
        line += f"  -> {clean(e['path'])}"
    return line


def run_follow(db: Database, ident: str | None, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print events until interrupted (Ctrl-C ends it quietly), or, for one message,
    until its final outcome; 1 when the ID names nothing."""
    if ident is None and not as_json:
        # Said once the starting point is read: what is sent from now on is shown.
        print("following every message from now on (Ctrl-C to stop)", file=out, flush=True)
    try:
        for e in follow(db, ident):
            print(json.dumps(e) if as_json else render_line(e, with_trace=ident is None), file=out, flush=True)
    except KeyboardInterrupt:
        return 0
    except UnknownMessage:
        print(f"{clean(ident)}: no such message (waited {FOLLOW_GRACE:g} s for it to arrive)", file=sys.stderr)
        return 1
    if ident is not None and not as_json:
        done = ", ".join(f"<{clean(a)}> {clean(st)}" for a, st in outcomes(db, ident))
        print(f"-- final: {done or 'no recipients'}", file=out, flush=True)
    return 0
