"""The database write paths the benchmark work added: the write gate, group commit, relaxed commits.

Real SQLite files in a temporary folder; several threads and a second process
write at once, as the MTA, queue manager and MDA do.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import Connection, event, func, select
from sqlalchemy.exc import OperationalError

from common.db import Database
from common.models import Event, add_event

REPO = Path(__file__).resolve().parents[2]


def _count(db: Database, event: str | None = None) -> int:
    with db.read() as s:
        q = select(func.count()).select_from(Event)
        if event is not None:
            q = q.where(Event.event == event)
        return int(s.scalar(q) or 0)


@pytest.mark.timeout(60)
def test_writers_in_threads_and_another_process_all_commit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    db = Database(url)
    db.create_schema()
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from common.db import Database; from common.models import add_event\n"
         "db = Database(sys.argv[1])\n"
         "for i in range(100):\n"
         "    with db.write() as s:\n"
         "        add_event(s, 'P', 'qmgr', 'other'); s.commit()\n", url],
        cwd=REPO,
    )

    def write(n: int) -> None:
        for _ in range(n):
            with db.write() as s:
                add_event(s, "T", "mta", "received")
                s.commit()

    threads = [threading.Thread(target=write, args=(50,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert child.wait(30) == 0
    assert _count(db, "received") == 200 and _count(db, "other") == 100
    db.close()


@pytest.mark.timeout(30)
def test_a_transaction_left_without_commit_lets_the_next_writer_in(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/q.db")
    db.create_schema()
    with db.write() as s:
        add_event(s, "T", "mta", "lost")  # closed without commit: rolled back
    with pytest.raises(RuntimeError), db.write() as s:
        add_event(s, "T", "mta", "lost")
        s.flush()
        raise RuntimeError("boom")
    done = threading.Event()

    def write() -> None:
        with db.write() as s:
            add_event(s, "T", "mta", "kept")
            s.commit()
        done.set()

    threading.Thread(target=write).start()
    assert done.wait(10), "the write gate was not released by a rollback"
    assert _count(db, "lost") == 0 and _count(db, "kept") == 1
    db.close()


@pytest.mark.timeout(30)
def test_group_commit_stores_every_call_and_isolates_a_failing_one(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/q.db")
    db.create_schema()

    def store(conn: Connection, n: int) -> int:
        assert isinstance(conn, Connection)  # Core, not an ORM Session: no transaction bookkeeping per call
        add_event(conn, f"T{n}", "mta", "received")
        if n == 7:
            raise ValueError("refused")
        return n

    async def main() -> list[int | BaseException]:
        return await asyncio.gather(*(db.write_batched(store, n) for n in range(30)), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[7], ValueError)
    assert [r for i, r in enumerate(results) if i != 7] == [n for n in range(30) if n != 7]
    assert _count(db, "received") == 29  # the failing call's row was rolled back alone
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Event).where(Event.trace_id == "T7")) == 0
    db.close()


@pytest.mark.timeout(30)
def test_group_commit_sets_savepoints_only_when_a_call_fails(tmp_path: Path) -> None:
    # SAVEPOINT and RELEASE around every call cost the queue manager a tenth of
    # its busy samples; they are needed only to isolate a call that raised.
    db = Database(f"sqlite:///{tmp_path}/q.db")
    db.create_schema()
    statements: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda conn, cur, sql, *_: statements.append(sql))
    runs: list[int] = []

    def store(conn: Connection, n: int, fail: bool) -> int:
        runs.append(n)
        add_event(conn, f"T{n}", "mta", "received")
        if fail and n == 3:
            raise ValueError("refused")
        return n

    async def batch(fail: bool) -> list[int | BaseException]:
        return await asyncio.gather(*(db.write_batched(store, n, fail) for n in range(10)), return_exceptions=True)

    assert asyncio.run(batch(False)) == list(range(10))
    assert runs == list(range(10))  # one batch, each call once
    assert not [s for s in statements if s.startswith("SAVEPOINT")]
    runs.clear()
    results = asyncio.run(batch(True))
    assert isinstance(results[3], ValueError) and [r for r in results if not isinstance(r, BaseException)] == [
        0, 1, 2, 4, 5, 6, 7, 8, 9]
    # Run until the failure, then again with a savepoint per call.
    assert runs == [0, 1, 2, 3, *range(10)]
    assert len([s for s in statements if s.startswith("SAVEPOINT")]) == 10
    assert _count(db, "received") == 19
    db.close()


@pytest.mark.timeout(30)
def test_group_commit_keeps_its_connection_and_replaces_one_that_failed(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/q.db")
    db.create_schema()
    seen: list[Connection] = []

    def store(conn: Connection, n: int) -> int:
        seen.append(conn)
        add_event(conn, f"T{n}", "mta", "received")
        return n

    async def main() -> None:
        assert await db.write_batched(store, 1) == 1
        assert await db.write_batched(store, 2) == 2
        assert seen[0] is seen[1]  # no pool checkout and reset per batch
        # The connection dies under the batcher (as a lost PostgreSQL connection
        # would): that batch fails, and the next one runs on a fresh connection.
        seen[1].connection.dbapi_connection.close()  # type: ignore[union-attr]
        with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises
            await db.write_batched(store, 3)
        assert await db.write_batched(store, 4) == 4
        assert seen[-1] is not seen[1]

    asyncio.run(main())
    assert _count(db, "received") == 3
    db.close()


@pytest.mark.timeout(30)
def test_relaxed_commits_are_visible_and_use_synchronous_normal(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/q.db")
    db.create_schema()
    with db.write_relaxed() as s:
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        add_event(s, "T", "mda", "delivered")
        s.commit()
    with db.write() as s:
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        s.rollback()
    assert _count(db, "delivered") == 1
    db.close()


@pytest.mark.timeout(30)
def test_checkpoint_runs_outside_a_transaction(tmp_path: Path) -> None:
    # The queue manager checkpoints every minute; this used to raise
    # "database table is locked" (a checkpoint inside BEGIN IMMEDIATE) and crash it.
    db = Database(f"sqlite:///{tmp_path}/q.db")
    db.create_schema()
    with db.write() as s:
        add_event(s, "T", "mta", "received")
        s.commit()
    db.checkpoint()
    db.checkpoint()
    assert _count(db) == 1
    db.close()


@pytest.mark.timeout(30)
def test_a_begin_that_finds_the_database_locked_fails_with_sqlalchemys_error(tmp_path: Path) -> None:
    # BEGIN runs on the driver's connection (common/db.py); callers still catch
    # SQLAlchemy's OperationalError when the database stays locked.
    db = Database(f"sqlite:///{tmp_path}/q.db")
    db.create_schema()
    other = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another program's write, without our write gate
    try:
        with db.engine.connect() as conn:
            driver = conn.connection.dbapi_connection
            assert driver is not None
            driver.execute("PRAGMA busy_timeout=50")
            with pytest.raises(OperationalError, match="locked"):
                conn.begin()
        other.rollback()
        with db.engine.begin() as conn:  # and the next transaction goes through
            add_event(conn, "T1", "mta", "received")
        assert _count(db, "received") == 1
    finally:
        other.close()
        db.close()
