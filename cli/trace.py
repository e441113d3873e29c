"""`mailroom trace ID`: one message's journey, hop by hop, from the events table.

`mailroom trace --follow [ID]` keeps reading the table and prints each hop as it
is recorded: one message's, or (without an ID) every message's.
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
from common.models import Event, Message


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
    db: Database, ident: str | None, *, poll: float = 0.2, stop: Callable[[], bool] = lambda: False
) -> Iterator[dict[str, Any]]:
    """Every event of one trace (by trace id or Message-ID), or of all traces when
    `ident` is None: first those already recorded, then each new one as it is
    committed.  Rows are read in id order, which is commit order with SQLite's
    single writer.  The starting point is read before this returns."""
    trace: str | None = None
    last = 0
    if ident is not None:
        with db.read() as s:
            trace = _resolve(s, ident)[1]
    else:
        # Everyone's mail: only what happens from now on.
        with db.read() as s:
            last = s.scalar(select(func.max(Event.id))) or 0
    return _tail(db, trace, last, poll, stop)


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
    """Print events until interrupted (Ctrl-C ends it quietly)."""
    if ident is None and not as_json:
        # Said once the starting point is read: what is sent from now on is shown.
        print("following every message from now on (Ctrl-C to stop)", file=out, flush=True)
    try:
        for e in follow(db, ident):
            print(json.dumps(e) if as_json else render_line(e, with_trace=ident is None), file=out, flush=True)
    except KeyboardInterrupt:
        pass
    return 0
