"""Opening the shared database, and running its blocking work off the event loop.

SQLite is the default and is tuned for a mail queue: WAL so readers never wait
for the writer, synchronous=FULL so a commit is on disk before we say 250, a
busy timeout so four processes can share one file, and write transactions that
start with BEGIN IMMEDIATE so two writers never deadlock half-way through.
PostgreSQL works through the same URL setting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import sessionmaker

from common.models import Base

T = TypeVar("T")


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    engine = create_engine(url, pool_size=8, max_overflow=8, pool_timeout=60)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that
        # BEGIN is ours to issue (the SQLAlchemy-documented recipe).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """Two session factories on one database: `write()` and `read()`.

    Use them as context managers: ``with db.write() as s: ...; s.commit()``.
    From async code, wrap the blocking function: ``await db.run(fn, args)``.
    """

    def __init__(self, url: str, *, threads: int = 4) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.engine = _sqlite_engine(url, immediate=True)
            self.read_engine = _sqlite_engine(url, immediate=False)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
            self.read_engine = self.engine
        self.write = sessionmaker(self.engine, expire_on_commit=False)
        self.read = sessionmaker(self.read_engine, expire_on_commit=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="db")

    def create_schema(self) -> None:
        """The one home of schema creation (idempotent)."""
        Base.metadata.create_all(self.engine)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking database (or fsync) work in the pool, keeping the loop free."""
        loop = asyncio.get_running_loop()
        # Carry the context (the trace id) into the thread, so its log lines keep it.
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await loop.run_in_executor(self._pool, call)

    def checkpoint(self) -> None:
        """Fold the WAL back into the main file so it does not grow without end."""
        if self.url.startswith("sqlite"):
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.dispose()
        self.read_engine.dispose()

