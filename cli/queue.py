"""`mailroom queue`: see and steer the queue (Postfix's postqueue and postsuper jobs).

Now is the daemons' now (`utcnow`: the process clock `mailroom` sets from the
config), so ages and "due now" agree with the queue manager's, lab time in a lab.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from cli.show import clean
from common.config import Config
from common.db import Database
from common.models import FINAL_STATES, Message, Recipient, utcnow
from mta import queue, wakeup


def _pending(s: Any, ident: str | None = None) -> list[Message]:
    q = select(Message).join(Recipient).where(Recipient.state.not_in(FINAL_STATES))
    if ident:
        q = q.where(Message.id == ident.upper())
    return list(s.scalars(q.distinct().order_by(Message.received)))


def listing(db: Database, ident: str | None = None) -> list[dict[str, Any]]:
    now = utcnow()
    with db.read() as s:
        return [
            {
                "id": m.id,
                "sender": m.sender,
                "size": m.size,
                "age": int((now - m.received).total_seconds()),
                "held": m.held,
                "received": m.received.isoformat(timespec="seconds"),
                "recipients": [
                    {
                        "address": r.address,
                        "state": r.state,
                        "attempts": r.attempts,
                        "next_attempt": r.next_attempt.isoformat(timespec="seconds"),
                        "last_reply": r.last_reply,
                    }
                    for r in m.recipients
                    if r.state not in FINAL_STATES
                ],
            }
            for m in _pending(s, ident)
        ]


def render_text(items: list[dict[str, Any]]) -> str:
    if not items:
        return "Mail queue is empty"
    out = []
    for m in items:
        held = " (held)" if m["held"] else ""
        out.append(
            f"{clean(m['id'])}{held}  {m['size']:>8}  {m['received']}  age {_age(m['age'])}  <{clean(m['sender'])}>"
        )
        for r in m["recipients"]:
            out.append(
                f"    {clean(r['address'])}  {clean(r['state'])}  tries={r['attempts']}  next={r['next_attempt']}"
            )
            if r["last_reply"]:
                out.append(f"        ({clean(r['last_reply'])})")
    out.append(f"-- {len(items)} message(s)")
    return "\n".join(out)


def _age(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def flush(cfg: Config, db: Database, ident: str | None) -> int:
    """Make queued recipients due now and wake the queue manager."""
    with db.write() as s:
        n = queue.make_due(s, ident.upper() if ident else None, utcnow())
        s.commit()
    wakeup.send(cfg.qmgr_socket)
    return n


def set_held(cfg: Config, db: Database, ident: str, held: bool) -> bool:
    with db.write() as s:
        done = queue.hold(s, ident.upper(), held)
        s.commit()
    if done and not held:
        wakeup.send(cfg.qmgr_socket)
    return done


def delete(db: Database, ident: str) -> int:
    """Drop a message without telling anyone (postsuper -d)."""
    with db.write() as s:
        n = queue.delete(s, ident.upper())
        s.commit()
    return n


def bounce_now(cfg: Config, db: Database, ident: str) -> int:
    """Return a message to its sender now, with a DSN."""
    with db.write() as s:
        n = queue.return_to_sender(s, ident.upper(), hostname=cfg.mailroom.hostname, now=utcnow())
        s.commit()
    wakeup.send(cfg.qmgr_socket)
    return n
