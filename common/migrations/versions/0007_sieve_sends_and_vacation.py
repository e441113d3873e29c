"""the vacation memory and the messages users' Sieve scripts sent

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 08:00:00

`vacation_replies` remembers whom each user's vacation action answered and
when (RFC 5230 4.2: at most once per sender per :days); `sieve_sends` counts
the redirects and vacation replies a user's script sent in the last hour,
against the same hourly limit as the user's own submissions.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vacation_replies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user", sa.String(320), nullable=False),
        sa.Column("sender", sa.String(320), nullable=False),
        sa.Column("handle", sa.String(64), nullable=False),
        sa.Column("sent", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("user", "sender", "handle", name="uq_vacation_replies"),
    )
    op.create_table(
        "sieve_sends",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user", sa.String(320), nullable=False),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(12), nullable=False),
    )
    op.create_index("ix_sieve_sends_user_time", "sieve_sends", ["user", "time"])


def downgrade() -> None:
    op.drop_index("ix_sieve_sends_user_time", table_name="sieve_sends")
    op.drop_table("sieve_sends")
    op.drop_table("vacation_replies")
