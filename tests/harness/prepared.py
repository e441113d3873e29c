"""What a statement run on the driver's cursor (common/prepared.py) must do on any database:
store and read what SQLAlchemy's Core would.  Run on SQLite by tests/unit/test_prepared.py
and on PostgreSQL by tests/interop/test_postgresql.py."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import bindparam, exc, insert, select, text, update

from common.db import Database
from common.events import EventName, Hop
from common.models import FINAL_STATES, QUEUED, Event, Message, Recipient
from common.prepared import Prepared, insert_all

INSERT_MESSAGE = Prepared(insert_all(Message))
_INSERT_EVENT = Prepared(insert_all(Event, leave_out=("id",)))
MESSAGE = Prepared(
    select(Message.id, Message.received, Message.held, Message.body).where(Message.id == bindparam("id"))
)
_TIMES = Prepared(select(Event.time).where(Event.trace_id == bindparam("trace")).order_by(Event.id))
# A value written in the statement (""), a literal IN list, and the caller's parameters.
_RESET = Prepared(
    update(Recipient)
    .where(Recipient.message_id == bindparam("trace"), Recipient.state.not_in(FINAL_STATES))
    .values(owner="", attempts=bindparam("n"))
)


def message_row(trace: str, received: dt.datetime) -> dict[str, object]:
    return {"id": trace, "sender": "a@example.org", "size": 3, "body": b"x\r\n", "received": received,
            "client": "", "message_id": "", "is_bounce": False, "digest": "", "held": True, "warned": False,
            "ret": "", "envid": "", "body_type": "7BIT", "smtputf8": False, "requiretls": False}


def check_like_core(db: Database) -> None:
    """The checks, on any database `db` (its schema made)."""
    whole = dt.datetime(2026, 12, 7, 10, 0, 0)  # no microseconds: the form most likely to differ
    fine = dt.datetime(2026, 12, 7, 10, 0, 0, 250)
    with db.engine.begin() as conn:
        INSERT_MESSAGE.run(conn, message_row("P1", whole))
        conn.execute(insert(Message), message_row("C1", whole))
        rows = [{"trace_id": "P1", "hop": Hop.MTA, "event": EventName.RECEIVED, "recipient": "", "detail": "",
                 "path": "", "time": t} for t in (fine, whole)]
        assert _INSERT_EVENT.run(conn, rows) == 2  # executemany: both rows
        conn.execute(insert(Event), [{**r, "trace_id": "C1"} for r in rows])
    with db.engine.begin() as conn:
        # Stored exactly as Core stores it (the datetime's text form on SQLite).
        stored = "SELECT received, held FROM messages WHERE id = :id"
        assert conn.execute(text(stored), {"id": "P1"}).one() == conn.execute(text(stored), {"id": "C1"}).one()
        by_trace = "SELECT time, hop, event FROM events WHERE trace_id = :t ORDER BY id"
        assert conn.execute(text(by_trace), {"t": "P1"}).all() == conn.execute(text(by_trace), {"t": "C1"}).all()
        # And read back as Core reads it: Python types, columns by name.
        [row] = MESSAGE.rows(conn, {"id": "P1"})
        assert (row.id, row.received, row.held, row.body) == ("P1", whole, True, b"x\r\n")
        assert tuple(row) == tuple(conn.execute(MESSAGE.statement, {"id": "P1"}).one())
        assert _TIMES.scalars(conn, {"trace": "P1"}) == [fine, whole]
        assert MESSAGE.rows(conn, {"id": "nothing"}) == []
        conn.execute(insert(Recipient), [
            {"message_id": "P1", "address": f"{n}@example.org", "state": state, "owner": "q", "attempts": 0}
            for n, state in enumerate([QUEUED, "delivered", "active"])])
        assert _RESET.run(conn, {"trace": "P1", "n": 7}) == 2  # the delivered one is left alone
        got = conn.execute(select(Recipient.state, Recipient.owner, Recipient.attempts).order_by(Recipient.id)).all()
        assert [tuple(r) for r in got] == [(QUEUED, "", 7), ("delivered", "q", 0), ("active", "", 7)]
    # In the caller's transaction: rolled back with it.
    with db.engine.connect() as conn:
        with conn.begin() as tx:
            INSERT_MESSAGE.run(conn, message_row("P2", fine))
            tx.rollback()
        with conn.begin():
            assert MESSAGE.rows(conn, {"id": "P2"}) == []
            # The driver's errors are SQLAlchemy's, as callers catch them.
            with pytest.raises(exc.IntegrityError):
                INSERT_MESSAGE.run(conn, message_row("P1", fine))
