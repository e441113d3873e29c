"""`mailroom trace ID`: one message's journey, hop by hop, from the events table."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import or_, select

from cli.show import clean
from common.db import Database
from common.models import Event, Message


def find(db: Database, ident: str) -> dict[str, Any] | None:
    """By trace id, or by Message-ID (with or without the angle brackets)."""
    with db.read() as s:
        mid = ident if ident.startswith("<") else f"<{ident}>"
        msg = s.scalars(
            select(Message).where(or_(Message.id == ident.upper(), Message.message_id == mid))
        ).first()
        trace = msg.id if msg else ident.upper()
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
    import datetime as dt

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
