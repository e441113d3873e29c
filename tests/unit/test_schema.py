"""The schema has one home: alembic's migrations must build exactly what common/models.py describes."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from common.db import Database
from common.models import Base


def test_migrations_match_the_models(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/m.db", threads=1)
    db.create_schema()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], "models changed without a migration: run alembic revision --autogenerate"


def test_create_schema_is_idempotent_and_versioned(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/m.db", threads=1)
    db.create_schema()
    db.create_schema()
    with db.engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) >= {"messages", "recipients", "events", "users", "aliases"}
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0001"
