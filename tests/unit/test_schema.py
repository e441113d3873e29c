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
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head_revision()


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parents[2] / "common" / "migrations"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def test_an_older_database_is_upgraded(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    db = Database(f"sqlite:///{tmp_path}/old.db", threads=1)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parents[2] / "common" / "migrations"))
    with db.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")  # as the first release left it
    db.create_schema()
    with db.engine.connect() as conn:
        indexes = {i["name"] for i in inspect(conn).get_indexes("recipients")}
        assert "ix_recipients_message_id" in indexes
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head_revision()
