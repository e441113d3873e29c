"""Users and aliases from memory: reloaded exactly when the tables changed."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlalchemy import delete, update

from common.db import Database
from common.directory import Directory, Snapshot
from common.models import Alias, User
from mta import aliases


def _db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path}/d.db", threads=1)
    db.create_schema()
    return db


def test_the_copy_is_kept_while_nothing_changes_and_reloaded_after_any_change(tmp_path: Path) -> None:
    db = _db(tmp_path)
    try:
        directory = Directory(db.read_engine)
        first = directory.current()
        assert first.user("alice@example.org") is None
        assert directory.current() is first  # nothing changed: no reload
        with db.write() as s:
            s.add(User(address="alice@example.org", mailbox="example.org/alice"))
            s.add(Alias(source="sales@example.org", target="alice@example.org"))
            s.commit()
        now = directory.current()
        assert now is not first
        entry = now.user("Alice+tag@Example.org", "+")
        assert entry is not None and entry.mailbox == "example.org/alice"
        assert now.targets("sales@example.org") == ["alice@example.org"]
        assert aliases.expand_from(now, "sales@example.org", local_domains=["example.org"]) == aliases.Expansion(
            ["alice@example.org"], []
        )
        assert directory.current() is now
        with db.write() as s:  # an update counts too
            s.execute(update(User).values(quota=100))
            s.commit()
        entry = directory.current().user("alice@example.org")
        assert entry is not None and entry.quota == 100
        with db.write() as s:  # and a delete
            s.execute(delete(Alias))
            s.commit()
        assert directory.current().targets("sales@example.org") == []
        # Writes to other tables do not throw the copy away.
        kept = directory.current()
        with db.write() as s:
            s.execute(update(User).where(User.address == "nobody@example.org").values(quota=1))
            s.commit()
        assert directory.current() is kept  # no row changed: SQLite runs no row trigger
    finally:
        db.close()


def test_expansion_from_memory_agrees_with_the_database(tmp_path: Path) -> None:
    db = _db(tmp_path)
    try:
        with db.write() as s:
            for a in ("alice@example.org", "bob@example.org"):
                s.add(User(address=a, mailbox=a))
            for src, dst in [("all@example.org", "alice@example.org"), ("all@example.org", "bob@example.org"),
                             ("bob@example.org", "bob@example.org"), ("bob@example.org", "bob@home.test"),
                             ("@example.org", "alice@example.org")]:
                s.add(Alias(source=src, target=dst))
            s.commit()
        snapshot = Directory(db.read_engine).current()
        with db.read() as s:
            for address in ("all@example.org", "bob@example.org", "bob+x@example.org", "whoever@example.org",
                            "alice@example.org"):
                mem = aliases.expand_from(snapshot, address, local_domains=["example.org"], delimiter="+")
                assert mem == aliases.expand(s, address, local_domains=["example.org"], delimiter="+"), address
    finally:
        db.close()


def test_if_current_answers_from_the_copy_only_while_it_is_current(tmp_path: Path) -> None:
    # The MTA's RCPT asks this on its event loop, with no thread hop.
    db = _db(tmp_path)
    try:
        directory = Directory(db.read_engine)
        assert directory.if_current() is None  # nothing loaded yet: ask current() in a thread
        first = directory.current()
        assert directory.if_current() is first
        with db.write() as s:
            s.add(User(address="alice@example.org", mailbox="example.org/alice"))
            s.commit()
        assert directory.if_current() is None  # a user was added: the copy is behind
        now = directory.current()
        assert now.user("alice@example.org") is not None and directory.if_current() is now
    finally:
        db.close()


def test_if_current_never_waits_for_a_lock(tmp_path: Path) -> None:
    # Another process holds the database file exclusively: the event loop must get
    # None at once (and go to a thread), not wait out the busy timeout.
    db = _db(tmp_path)
    with db.write() as s:
        s.add(User(address="alice@example.org", mailbox="example.org/alice"))
        s.commit()
    generation = Directory(db.read_engine).current().generation
    db.close()
    holder = sqlite3.connect(tmp_path / "d.db", isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE users SET quota = 5")
        db = Database(f"sqlite:///{tmp_path}/d.db", threads=1)
        directory = Directory(db.read_engine)
        directory._snapshot = Snapshot(generation, {}, {})  # as if loaded before the lock was taken
        started = time.monotonic()
        assert directory.if_current() is None
        assert time.monotonic() - started < 1.0
    finally:
        holder.close()
        db.close()
