"""The database schema brought to the newest revision: the alembic migrations in common/migrations.

In two steps, so that a daemon reads the migration scripts while it is still
root (`scripts()`, called before the switch) and runs them once it is the
Mailroom user (`upgrade()`, on its own connection): after the switch nothing
here reads a file, so the upgrade works even where that user may not read
the code.  `upgrade()` does what `alembic upgrade head` does, with env.py's
body (`run`) called directly instead of read from its file.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import context
from alembic.config import Config as AlembicConfig
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, RevisionStep
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from common.models import Base

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


@functools.cache
def scripts() -> ScriptDirectory:
    """Every migration script, read now (once per process)."""
    script = ScriptDirectory.from_config(_config())
    script.get_heads()  # reads and loads every version file
    return script


def run(connection: Connection) -> None:
    """env.py's work: the pending migrations, in one transaction on `connection`."""
    # transactional_ddl: every daemon upgrades at start, possibly at the same time;
    # in one transaction (BEGIN IMMEDIATE on SQLite) the second one waits and then
    # finds the schema current instead of creating the tables twice.
    context.configure(
        connection=connection, target_metadata=Base.metadata, transactional_ddl=True, render_as_batch=True
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # PostgreSQL lets two transactions run the same CREATE TABLE and fails
            # the second (UniqueViolation on pg_type): take turns on a lock held
            # until this transaction ends; the key is b"mailroom" as a bigint.
            connection.execute(text("SELECT pg_advisory_xact_lock(7881696737372368749)"))
        context.run_migrations()


def upgrade(connection: Connection) -> None:
    """Bring the schema on `connection` to the newest revision (a no-op when current)."""
    script = scripts()
    cfg = _config()
    cfg.attributes["connection"] = connection

    def steps(rev: str, _context: MigrationContext) -> list[RevisionStep]:
        return script._upgrade_revs("head", rev)  # what alembic's `upgrade` command runs

    with EnvironmentContext(cfg, script, fn=steps, destination_rev="head"):
        run(connection)
