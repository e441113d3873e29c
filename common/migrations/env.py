"""Alembic's entry point for Mailroom's schema.

At every start `Database.create_schema` runs the migrations on its own
connection.  From the command line (`alembic revision --autogenerate -m ...`
in the project folder, after editing common/models.py) alembic.ini names the
database to compare against.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, text

from common.models import Base


def run(connection: Connection) -> None:
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


given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    with create_engine(context.config.get_main_option("sqlalchemy.url", "")).connect() as conn:
        run(conn)
        conn.commit()
