"""a counter that moves whenever users or aliases change, so daemons may cache them

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 18:40:00

The MTA and the MDA answer recipient and alias look-ups from memory
(common/directory.py) and reload only when this counter moved.  Triggers move
it, so every writer counts: `mailroom user` and `mailroom alias`, the web
pages, a test or an operator's own SQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TABLES = ("users", "aliases")


def upgrade() -> None:
    op.create_table(
        "directory_generation",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("value", sa.Integer(), nullable=False, server_default="0"),
    )
    op.execute("INSERT INTO directory_generation (id, value) VALUES (1, 0)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION mailroom_directory_changed() RETURNS trigger AS $$ BEGIN "
            "UPDATE directory_generation SET value = value + 1 WHERE id = 1; RETURN NULL; "
            "END $$ LANGUAGE plpgsql"
        )
        for table in _TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION mailroom_directory_changed()"
            )
        return
    for table in _TABLES:
        for action in ("INSERT", "UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_{action.lower()}_changed AFTER {action} ON {table} "
                "BEGIN UPDATE directory_generation SET value = value + 1 WHERE id = 1; END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in _TABLES:
            op.execute(f"DROP TRIGGER {table}_changed ON {table}")
        op.execute("DROP FUNCTION mailroom_directory_changed()")
    else:
        for table in _TABLES:
            for action in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER {table}_{action}_changed")
    op.drop_table("directory_generation")
