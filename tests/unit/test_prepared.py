"""Statements run on the driver's cursor (common/prepared.py) store and read what Core would.

The shared checks (tests/harness/prepared.py) run on a real SQLite file here,
and on a throwaway PostgreSQL cluster in tests/interop/test_postgresql.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, bindparam, insert, select

from common.db import Database
from common.models import Message, Recipient
from common.prepared import Prepared
from tests.harness.prepared import INSERT_MESSAGE, MESSAGE, check_like_core, message_row


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path}/p.db", threads=1)
    database.create_schema()
    yield database
    database.close()


def test_prepared_statements_store_and_read_as_core_does_on_sqlite(db: Database) -> None:
    check_like_core(db)


def test_what_a_plain_cursor_cannot_run_is_refused_at_its_first_run(db: Database) -> None:
    with db.engine.begin() as conn:
        listed = Prepared(select(Message.id).where(Message.id.in_(bindparam("ids", expanding=True))))
        with pytest.raises(ValueError, match="IN list"):
            listed.rows(conn, {"ids": ["P1"]})
        # Recipient.lease has a default computed in Python: an INSERT must name it.
        short = Prepared(insert(Recipient).values(message_id=bindparam("m"), address=bindparam("a")))
        with pytest.raises(ValueError, match="Python default"):
            short.run(conn, {"m": "P1", "a": "b@example.org"})
    with db.engine.connect() as conn, pytest.raises(AssertionError, match="transaction"):
        MESSAGE.rows(conn, {"id": "P1"})


def test_run_on_a_session_connection(db: Database) -> None:
    # The operator's commands hand their Session's connection: it is in a transaction.
    with db.write() as s:
        conn: Connection = s.connection()
        INSERT_MESSAGE.run(conn, message_row("S1", dt.datetime(2026, 1, 1)))
        s.commit()
    with db.read() as s:
        assert s.scalar(select(Message.received).where(Message.id == "S1")) == dt.datetime(2026, 1, 1)
