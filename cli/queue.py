"""`mailroom queue`: see and steer the queue (Postfix's postqueue and postsuper jobs).

Now is the daemons' now (`utcnow`: the process clock `mailroom` sets from the
config), so ages and "due now" agree with the queue manager's, lab time in a lab.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Done:
    """What an operator's action did, for `mailroom queue` to say (and its exit status)."""

    ok: bool
    text: str


def qmgr_running(cfg: Config) -> bool:
    """Whether a queue manager listens on its wake-up socket (and so was just woken)."""
    return wakeup.scan(cfg.qmgr_socket)


def _not_running(cfg: Config) -> str:
    return (f"the queue manager is not running (nothing listens on {cfg.qmgr_socket}); "
            "`mailroom start qmgr` (or `mailroom run`) starts it")


def flush(cfg: Config, db: Database, ident: str | None) -> Done:
    """Make queued recipients due now and wake the queue manager (held messages wait)."""
    trace = ident.upper() if ident else None
    with db.write() as s:
        if trace is not None:
            state = queue.held_state(s, trace)
            if state is None:
                return Done(False, f"{clean(ident)}: not in the queue")
            if state:
                return Done(False, f"{trace} is held: nothing is tried (`mailroom queue release {trace}` first)")
        n = queue.make_due(s, trace, utcnow())
        held = queue.held_count(s) if trace is None else 0
        s.commit()
    kept = f"; {held} held message(s) left waiting" if held else ""
    if not qmgr_running(cfg):
        return Done(False, f"{n} recipient(s) made due, but nothing is tried now: {_not_running(cfg)}{kept}")
    return Done(True, f"{n} recipient(s) due now; the queue manager is trying them{kept}")


def set_held(cfg: Config, db: Database, ident: str, held: bool) -> Done:
    """Hold or release a message.  Already so: said, nothing recorded, exit status 0."""
    trace = ident.upper()
    with db.write() as s:
        state = queue.held_state(s, trace)
        if state is None:
            return Done(False, f"{clean(ident)}: not in the queue")
        if state == held:
            return Done(True, f"{trace} is already {'held' if held else 'not held'}: nothing changed")
        queue.hold(s, trace, held)
        n = queue.unfinished_count(s, trace)
        s.commit()
    if held:
        return Done(True, f"{trace} held: its {n} recipient(s) wait until `mailroom queue release {trace}`")
    text = f"{trace} released: its {n} recipient(s) are tried at their next attempt time"
    if not qmgr_running(cfg):
        text += f" ({_not_running(cfg)})"
    return Done(True, text)


def delete(db: Database, ident: str) -> Done:
    """Drop a message without telling anyone (postsuper -d)."""
    trace = ident.upper()
    with db.write() as s:
        n = queue.delete(s, trace)
        s.commit()
    if not n:
        return Done(False, f"{clean(ident)}: not in the queue")
    return Done(True, f"{trace} deleted: {n} recipient(s) taken out of the queue; nobody is told")


def bounce_now(cfg: Config, db: Database, ident: str) -> Done:
    """Return a message to its sender now, with a DSN."""
    trace = ident.upper()
    with db.write() as s:
        msg = s.get(Message, trace)
        sender, is_bounce = (msg.sender, msg.is_bounce) if msg is not None else ("", False)
        n = queue.return_to_sender(s, trace, hostname=cfg.mailroom.hostname, now=utcnow())
        s.commit()
    if not n:
        return Done(False, f"{clean(ident)}: not in the queue")
    if sender and not is_bounce:
        told = f"a delivery status notification goes to <{clean(sender)}>"
        if not qmgr_running(cfg):
            told += f" when the queue manager runs ({_not_running(cfg)})"
    else:
        told = "no notification: it is itself a notification (null sender), which is never answered"
    return Done(True, f"{trace} returned to sender: {n} recipient(s) bounced; {told}")
