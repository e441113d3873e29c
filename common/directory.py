"""Users and aliases answered from memory: the look-ups behind every RCPT.

The MTA expands aliases and the MDA finds mailboxes once per recipient; asking
the database each time cost a read transaction and ORM loads per look-up.  A
`Directory` keeps a copy of both tables and, before each answer, reads one
integer: `directory_generation.value`, which database triggers move whenever
`users` or `aliases` change (whoever changes them).  When it moved, the copy
is loaded again, so a user added a moment ago is found at once.

That one integer is read on every look-up, so on SQLite it is read over a
plain sqlite3 connection kept by each thread (a prepared statement, a few
microseconds) rather than through SQLAlchemy's connection checkout, BEGIN and
ROLLBACK, which cost the MDA a fifth of its Python time (py-spy, load 1).
Only when it moved are the tables read, through SQLAlchemy, in one
transaction with the generation.

`if_current()` spares the MTA's RCPT even the thread hop: on SQLite it reads
the integer on the event loop itself, over a connection that never waits for
a lock (a busy database answers None at once, and the caller asks `current()`
in a thread).  A WAL reader takes no lock a writer holds, and the one row is
always in the page cache, so the read costs microseconds and cannot stall the
loop behind a slow disk or another process's transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass

from sqlalchemy import Engine, select

from common.address import lookup_key
from common.models import Alias, DirectoryGeneration, User


@dataclass(frozen=True)
class UserEntry:
    address: str
    store: str
    mailbox: str
    quota: int


@dataclass(frozen=True)
class Snapshot:
    """The two tables as they were at one generation."""

    generation: int
    users: dict[str, UserEntry]
    aliases: dict[str, list[str]]

    def user(self, address: str, delimiter: str = "") -> UserEntry | None:
        """The user an address delivers to directly (user+tag@domain -> user@domain)."""
        return self.users.get(lookup_key(address, delimiter))

    def targets(self, source: str) -> list[str]:
        return self.aliases.get(source, [])


_GENERATION = select(DirectoryGeneration.value).where(DirectoryGeneration.id == 1)
_GENERATION_SQL = "SELECT value FROM directory_generation WHERE id = 1"
_USERS = select(User.address, User.store, User.mailbox, User.quota)
_ALIASES = select(Alias.source, Alias.target).order_by(Alias.id)


class Directory:
    """A per-process copy of users and aliases, reloaded when the generation moved."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        url = engine.url
        self._sqlite_file = (
            url.database if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") else None
        )
        self._local = threading.local()

    def cached(self) -> Snapshot | None:
        """The copy as last loaded, without asking the database (None before the first
        load).  It may be behind: a caller that trusts it checks `current()` later."""
        return self._snapshot

    def current(self) -> Snapshot:
        """The tables as they are now (blocking: call it from a database thread)."""
        snapshot = self._snapshot
        if snapshot is not None and self._sqlite_file is not None:
            generation = self._read_generation()
            if generation is not None and generation == snapshot.generation:
                return snapshot
        with self.engine.connect() as conn:
            generation = conn.execute(_GENERATION).scalar()
            snapshot = self._snapshot
            if snapshot is not None and snapshot.generation == generation:
                return snapshot
            with self._lock:
                # Read in the same transaction as the generation: a change
                # committed between the two reads moves it again, so the next
                # call reloads instead of keeping a half-new copy.
                users = {r.address: UserEntry(r.address, r.store, r.mailbox, r.quota) for r in conn.execute(_USERS)}
                aliases: dict[str, list[str]] = {}
                for source, target in conn.execute(_ALIASES):
                    aliases.setdefault(source, []).append(target)
                # A database without the counter (None) is reloaded every time.
                snapshot = Snapshot(-1 if generation is None else int(generation), users, aliases)
                if generation is not None:
                    self._snapshot = snapshot
                return snapshot

    def if_current(self) -> Snapshot | None:
        """The copy, if it is current (SQLite only; never waits: call it on the event loop).
        None: not known to be current, ask `current()` in a thread."""
        snapshot = self._snapshot
        if snapshot is None or self._sqlite_file is None:
            return None
        return snapshot if self._read_generation(timeout=0) == snapshot.generation else None

    def _read_generation(self, timeout: float = 30) -> int | None:
        """The generation, read over this thread's own sqlite3 connection (None if it cannot be)."""
        # Per thread, and per timeout: the event loop's connection waits for no lock.
        kind = "waiting" if timeout else "quick"
        conn: sqlite3.Connection | None = getattr(self._local, kind, None)
        try:
            if conn is None:
                assert self._sqlite_file is not None
                # Autocommit (no BEGIN of ours): each SELECT reads the newest committed state.
                conn = sqlite3.connect(self._sqlite_file, timeout=timeout, isolation_level=None,
                                       check_same_thread=False)
                setattr(self._local, kind, conn)
            row = conn.execute(_GENERATION_SQL).fetchone()
        except sqlite3.Error:
            setattr(self._local, kind, None)
            return None  # the table is missing, the file moved: the SQLAlchemy path decides
        return None if row is None or row[0] is None else int(row[0])
