"""Users and aliases from memory: reloaded exactly when the tables changed."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import delete, update

from common.db import Database
from common.directory import Directory
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
