"""accounts of the admin page, and the DMARC verdicts the daily aggregate reports are made of

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admins",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(length=64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "dmarc_verdicts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("source_ip", sa.String(length=45), nullable=False),
        sa.Column("header_from", sa.String(length=255), nullable=False),
        sa.Column("envelope_from", sa.String(length=255), nullable=False),
        sa.Column("spf_domain", sa.String(length=255), nullable=False),
        sa.Column("spf_result", sa.String(length=12), nullable=False),
        sa.Column("dkim", sa.Text(), nullable=False),
        sa.Column("result", sa.String(length=12), nullable=False),
        sa.Column("disposition", sa.String(length=12), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("policy_domain", sa.String(length=255), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
    )
    op.create_index("ix_dmarc_verdicts_time", "dmarc_verdicts", ["time"])
    op.create_index("ix_dmarc_verdicts_header_from", "dmarc_verdicts", ["header_from"])


def downgrade() -> None:
    op.drop_index("ix_dmarc_verdicts_header_from", table_name="dmarc_verdicts")
    op.drop_index("ix_dmarc_verdicts_time", table_name="dmarc_verdicts")
    op.drop_table("dmarc_verdicts")
    op.drop_table("admins")
