"""Statements run on the driver's cursor (common/prepared.py) store and read what Core would.

Each check runs on a real SQLite file here, and on a throwaway PostgreSQL
cluster in tests/interop/test_postgresql.py (`check_like_core`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import Connection, bindparam, exc, insert, select, text, update

from common.db import Database
from common.events import EventName, Hop
from common.models import FINAL_STATES, QUEUED, Event, Message, Recipient
from common.prepared import Prepared, insert_all

_INSERT_MESSAGE = Prepared(insert_all(Message))
_INSERT_EVENT = Prepared(insert_all(Event, leave_out=("id",)))
_MESSAGE = Prepared(
    select(Message.id, Message.received, Message.held, Message.body).where(Message.id == bindparam("id"))
)
_TIMES = Prepared(select(Event.time).where(Event.trace_id == bindparam("trace")).order_by(Event.id))
# A value written in the statement (""), a literal IN list, and the caller's parameters.
_RESET = Prepared(
    update(Recipient)
    .where(Recipient.message_id == bindparam("trace"), Recipient.state.not_in(FINAL_STATES))
    .values(owner="", attempts=bindparam("n"))
)


def _message(trace: str, received: dt.datetime) -> dict[str, object]:
    return {"id": trace, "sender": "a@example.org", "size": 3, "body": b"x\r\n", "received": received,
            "client": "", "message_id": "", "is_bounce": False, "digest": "", "held": True, "warned": False,
            "ret": "", "envid": "", "body_type": "7BIT", "smtputf8": False, "requiretls": False}


def check_like_core(db: Database) -> None:
    """The checks, on any database `db` (its schema made)."""
    whole = dt.datetime(2026, 12, 7, 10, 0, 0)  # no microseconds: the form most likely to differ
    fine = dt.datetime(2026, 12, 7, 10, 0, 0, 250)
    with db.engine.begin() as conn:
        _INSERT_MESSAGE.run(conn, _message("P1", whole))
        conn.execute(insert(Message), _message("C1", whole))
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
        [row] = _MESSAGE.rows(conn, {"id": "P1"})
        assert (row.id, row.received, row.held, row.body) == ("P1", whole, True, b"x\r\n")
        assert tuple(row) == tuple(conn.execute(_MESSAGE.statement, {"id": "P1"}).one())
        assert _TIMES.scalars(conn, {"trace": "P1"}) == [fine, whole]
        assert _MESSAGE.rows(conn, {"id": "nothing"}) == []
        conn.execute(insert(Recipient), [
            {"message_id": "P1", "address": f"{n}@example.org", "state": state, "owner": "q", "attempts": 0}
            for n, state in enumerate([QUEUED, "delivered", "active"])])
        assert _RESET.run(conn, {"trace": "P1", "n": 7}) == 2  # the delivered one is left alone
        got = conn.execute(select(Recipient.state, Recipient.owner, Recipient.attempts).order_by(Recipient.id)).all()
        assert [tuple(r) for r in got] == [(QUEUED, "", 7), ("delivered", "q", 0), ("active", "", 7)]
    # In the caller's transaction: rolled back with it.
    with db.engine.connect() as conn:
        with conn.begin() as tx:
            _INSERT_MESSAGE.run(conn, _message("P2", fine))
            tx.rollback()
        with conn.begin():
            assert _MESSAGE.rows(conn, {"id": "P2"}) == []
            # The driver's errors are SQLAlchemy's, as callers catch them.
            with pytest.raises(exc.IntegrityError):
                _INSERT_MESSAGE.run(conn, _message("P1", fine))


def test_prepared_statements_store_and_read_as_core_does_on_sqlite(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/p.db", threads=1)
    db.create_schema()
    try:
        check_like_core(db)
    finally:
        db.close()


def test_what_a_plain_cursor_cannot_run_is_refused_at_its_first_run(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/p.db", threads=1)
    db.create_schema()
    try:
        with db.engine.begin() as conn:
            listed = Prepared(select(Message.id).where(Message.id.in_(bindparam("ids", expanding=True))))
            with pytest.raises(ValueError, match="IN list"):
                listed.rows(conn, {"ids": ["P1"]})
            # Recipient.lease has a default computed in Python: an INSERT must name it.
            short = Prepared(insert(Recipient).values(message_id=bindparam("m"), address=bindparam("a")))
            with pytest.raises(ValueError, match="Python default"):
                short.run(conn, {"m": "P1", "a": "b@example.org"})
        with db.engine.connect() as conn, pytest.raises(AssertionError, match="transaction"):
            _MESSAGE.rows(conn, {"id": "P1"})
    finally:
        db.close()


def test_run_on_a_session_connection(tmp_path: Path) -> None:
    # The operator's commands hand their Session's connection: it is in a transaction.
    db = Database(f"sqlite:///{tmp_path}/p.db", threads=1)
    db.create_schema()
    try:
        with db.write() as s:
            conn: Connection = s.connection()
            _INSERT_MESSAGE.run(conn, _message("S1", dt.datetime(2026, 1, 1)))
            s.commit()
        with db.read() as s:
            assert s.scalar(select(Message.received).where(Message.id == "S1")) == dt.datetime(2026, 1, 1)
    finally:
        db.close()
