"""what the sender asked of delivery: DSN options, 8BITMIME, SMTPUTF8, REQUIRETLS

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 18:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ret", sa.String(length=4), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("envid", sa.String(length=100), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("body_type", sa.String(length=10), nullable=False, server_default="7BIT"))
        batch_op.add_column(sa.Column("smtputf8", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("requiretls", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("recipients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("notify", sa.String(length=24), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("orcpt", sa.String(length=500), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("recipients", schema=None) as batch_op:
        batch_op.drop_column("orcpt")
        batch_op.drop_column("notify")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("requiretls")
        batch_op.drop_column("smtputf8")
        batch_op.drop_column("body_type")
        batch_op.drop_column("envid")
        batch_op.drop_column("ret")
