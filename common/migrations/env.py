"""Alembic's entry point for Mailroom's schema.

At every start `Database.create_schema` runs the migrations on its own
connection without reading this file (common/schema.py, whose `run` is the
body of this one).  From the command line (`alembic revision --autogenerate -m ...`
in the project folder, after editing common/models.py) alembic.ini names the
database to compare against.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from common.schema import run

given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    with create_engine(context.config.get_main_option("sqlalchemy.url", "")).connect() as conn:
        run(conn)
        conn.commit()
