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
import contextlib
import contextvars
import fcntl
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")


class _WriteGate:
    """A queue for SQLite's one write lock that wakes the next writer at once.

    When BEGIN IMMEDIATE finds the database locked, SQLite's busy handler
    sleeps and retries, backing off 1, 2, 5, 10 ... 100 ms, while the lock is
    usually free again within a millisecond (one fsync'd commit).  Under load
    writers spent most of their time in those sleeps (py-spy on the MTA, queue
    manager and MDA: a quarter of all samples in `BEGIN IMMEDIATE`).  So before
    BEGIN IMMEDIATE a writer takes this gate: a mutex for the threads of this
    process (they wake in turn, no polling) and an flock() on a file next to the
    database for the other processes (polled, but every 0.2-2 ms).  SQLite's own
    lock still guards the data; the gate only orders the waiters, and a writer
    that cannot get it within the busy timeout goes on to SQLite's own waiting.
    A killed process drops its flock with its file descriptor.
    """

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._mutex = threading.Lock()
        self._fd = os.open(path + "-writers", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)

    def acquire(self) -> bool:
        deadline = time.monotonic() + self.timeout
        if not self._mutex.acquire(timeout=self.timeout):
            return False
        delay = 0.0002
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._mutex.release()
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.002)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._mutex.release()

    def close(self) -> None:
        os.close(self._fd)


class _GatedConnection(sqlite3.Connection):
    """A sqlite3 connection that lets go of the write gate when its transaction ends."""

    gate: _WriteGate | None = None
    holds_gate = False

    def _let_go(self) -> None:
        if self.holds_gate and self.gate is not None:
            self.holds_gate = False
            self.gate.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._let_go()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._let_go()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._let_go()


def _sqlite_path(url: str) -> str | None:
    prefix = "sqlite:///"
    if not url.startswith(prefix) or ":memory:" in url:
        return None
    path = url[len(prefix):].split("?", 1)[0]
    return path or None


_gates: dict[str, _WriteGate] = {}
_gates_lock = threading.Lock()


def _gate_for(path: str) -> _WriteGate | None:
    """One gate per database file per process, shared by every engine that writes it."""
    with _gates_lock:
        gate = _gates.get(path)
        if gate is None:
            try:
                gate = _gates[path] = _WriteGate(path)
            except OSError:
                return None  # e.g. a read-only folder: SQLite's own waiting still works
        return gate


def _sqlite_engine(url: str, immediate: bool, synchronous: str = "FULL") -> Engine:
    path = _sqlite_path(url)
    gate = _gate_for(path) if immediate and path is not None else None
    connect_args: dict[str, Any] = {"factory": _GatedConnection} if gate is not None else {}
    engine = create_engine(url, pool_size=8, max_overflow=8, pool_timeout=60, connect_args=connect_args)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that
        # BEGIN is ours to issue (the SQLAlchemy-documented recipe).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        dbapi = conn.connection.dbapi_connection
        if not immediate:
            _begin(conn, dbapi, "BEGIN")
            return
        gated = gate is not None and isinstance(dbapi, _GatedConnection) and not dbapi.holds_gate
        if gated and gate is not None and gate.acquire():
            dbapi.gate, dbapi.holds_gate = gate, True
        try:
            _begin(conn, dbapi, "BEGIN IMMEDIATE")
        except BaseException:
            if isinstance(dbapi, _GatedConnection):
                dbapi._let_go()
            raise

    return engine


def _begin(conn: Connection, dbapi: sqlite3.Connection, sql: str) -> None:
    """BEGIN on the driver's connection: once per transaction, so without the
    execution context of SQLAlchemy's own statements (common/prepared.py says
    why); a failure comes out as SQLAlchemy's error, as it would from there."""
    try:
        dbapi.execute(sql)
    except sqlite3.Error as error:
        raise exc.DBAPIError.instance(sql, (), error, sqlite3.Error, dialect=conn.dialect) from error


class Database:
    """Session factories on one database: `write()`, `read()` and `write_relaxed()`.

    Use them as context managers: ``with db.write() as s: ...; s.commit()``.
    From async code, wrap the blocking function: ``await db.run(fn, args)``.

    `write()` commits are fsync'd (synchronous=FULL): use them for anything a
    reply promises.  `write_relaxed()` commits (synchronous=NORMAL in WAL mode)
    are written but not fsync'd; the next fsync'd commit of any process makes
    them durable too, and a power cut can lose only the last few.  They are
    for records whose loss no promise depends on (trace events, a claim that
    a restart releases, a delivery already fsync'd in the mailbox).

    `await db.write_batched(fn, args)` is group commit: fn(conn, *args) runs
    on a Core `Connection` in one write transaction together with whatever
    other calls arrived while the previous batch was committing, and all of
    them wait for that one fsync'd commit.  One that raises gets its
    exception and the rest still commit: the batch is then run again with each
    call under its own SAVEPOINT.  So fn may run twice, and must do nothing
    but its statements (no log lines, no messages sent) until it returns.
    """

    def __init__(self, url: str, *, threads: int = 4) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.engine = _sqlite_engine(url, immediate=True)
            self.read_engine = _sqlite_engine(url, immediate=False)
            self.relaxed_engine = _sqlite_engine(url, immediate=True, synchronous="NORMAL")
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
            self.read_engine = self.engine
            self.relaxed_engine = self.engine
        self.write = sessionmaker(self.engine, expire_on_commit=False)
        self.read = sessionmaker(self.read_engine, expire_on_commit=False)
        self.write_relaxed = sessionmaker(self.relaxed_engine, expire_on_commit=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="db")
        self._batches = {False: _Batcher(self.engine, self._pool), True: _Batcher(self.relaxed_engine, self._pool)}

    def create_schema(self) -> None:
        """The one home of schema creation and upgrades: the alembic migrations in
        common/migrations, brought to the newest revision (a no-op when current).
        To change the schema: edit common/models.py, then
        `alembic -x ... revision --autogenerate` (see docs/operations.md)."""
        from common import schema

        with self.engine.connect() as conn:
            schema.upgrade(conn)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking database (or fsync) work in the pool, keeping the loop free."""
        loop = asyncio.get_running_loop()
        # Carry the context (the trace id) into the thread, so its log lines keep it.
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await loop.run_in_executor(self._pool, call)

    async def write_batched(self, fn: Callable[..., T], *args: Any, relaxed: bool = False) -> T:
        """Group commit: run fn(conn, *args) in a shared write transaction.

        `conn` is a SQLAlchemy Core Connection, not an ORM Session: this runs
        for every message, and a Session's transaction bookkeeping was a fifth
        of the MTA's samples (py-spy, load 1).  With relaxed=True the shared
        commit is not fsync'd (see write_relaxed).
        """
        return cast(T, await self._batches[relaxed].submit(fn, args))

    def checkpoint(self) -> None:
        """Fold the WAL back into the main file so it does not grow without end."""
        if self.url.startswith("sqlite"):
            # On the raw connection, outside any transaction: SQLAlchemy would
            # first issue our BEGIN IMMEDIATE, and SQLite refuses to checkpoint
            # inside a transaction ("database table is locked"), which crashed
            # the queue manager after its first minute.
            raw = self.engine.raw_connection()
            try:
                raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # type: ignore[union-attr]
            finally:
                raw.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for batcher in self._batches.values():
            batcher.close()
        self.engine.dispose()
        self.read_engine.dispose()
        self.relaxed_engine.dispose()


def connection_of(conn: Connection | Session) -> Connection:
    """The Core connection to run statements on: group commit hands functions a
    Connection; the operator's commands and tests may still hold a Session."""
    return conn.connection() if isinstance(conn, Session) else conn


class _Batcher:
    """Collects write_batched() calls and commits them together, one batch at a time."""

    def __init__(self, engine: Engine, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.engine = engine
        self.pool = pool
        self.pending: list[_BatchItem] = []
        self.draining = False
        # Batches run one at a time, so they keep one connection rather than
        # take one from the pool and give it back (and have it reset) each time.
        self.conn: Connection | None = None

    async def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append(_BatchItem(fn, args, contextvars.copy_context(), future))
        if not self.draining:
            self.draining = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    outcomes = await loop.run_in_executor(self.pool, self._run, batch)
                except BaseException as exc:  # the commit itself failed: nobody's work is stored
                    outcomes = [(False, exc)] * len(batch)
                for item, (ok, value) in zip(batch, outcomes, strict=True):
                    if item.future.done():
                        continue
                    if ok:
                        item.future.set_result(value)
                    else:
                        item.future.set_exception(cast(BaseException, value))
        finally:
            self.draining = False

    def _run(self, batch: list[_BatchItem]) -> list[tuple[bool, Any]]:
        if self.conn is None:
            self.conn = self.engine.connect()
        conn = self.conn
        try:
            return self._run_on(conn, batch)
        except BaseException:
            # The transaction itself failed (BEGIN, the commit, a lost
            # connection): closing rolls back whatever was not committed, and
            # the next batch starts on a fresh connection from the pool.
            self.conn = None
            with contextlib.suppress(Exception):
                conn.close()
            raise

    def _run_on(self, conn: Connection, batch: list[_BatchItem]) -> list[tuple[bool, Any]]:
        tx = conn.begin()
        outcomes: list[tuple[bool, Any]] = []
        for item in batch:
            try:
                outcomes.append((True, item.context.run(item.fn, conn, *item.args)))
            except Exception as exc:  # noqa: BLE001 - handed to that caller alone
                tx.rollback()
                if len(batch) == 1:
                    return [(False, exc)]
                break
        else:
            tx.commit()
            return outcomes
        # A call raised, and its statements may be half done in the shared
        # transaction: start again with each call under its own savepoint,
        # so that it alone fails.  Savepoints only then: SAVEPOINT and
        # RELEASE around every call were a tenth of the queue manager's
        # busy samples, and calls almost never fail.
        return self._run_isolated(conn, batch)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    @staticmethod
    def _run_isolated(conn: Connection, batch: list[_BatchItem]) -> list[tuple[bool, Any]]:
        tx = conn.begin()
        outcomes: list[tuple[bool, Any]] = []
        for item in batch:
            savepoint = conn.begin_nested()
            try:
                value = item.context.run(item.fn, conn, *item.args)
            except Exception as exc:  # noqa: BLE001 - handed to that caller alone
                savepoint.rollback()
                outcomes.append((False, exc))
                continue
            savepoint.commit()
            outcomes.append((True, value))
        tx.commit()
        return outcomes


@dataclass
class _BatchItem:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    context: contextvars.Context
    future: asyncio.Future[Any]

