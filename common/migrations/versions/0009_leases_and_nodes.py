"""claims are leases; one heartbeat row per node

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 12:00:00

Several hosts share one database (docs/cluster.md): a queue manager's claim
on a recipient carries a token (`lease`) and an expiry (`lease_expires`) that
its holder moves on while it works; any queue manager takes over a recipient
whose lease expired, and a settle that cannot show the token is dropped.
`nodes` holds each node's roles and last heartbeat, for `mailroom status --cluster`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("recipients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease", sa.String(length=32), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("lease_expires", sa.DateTime(), nullable=True))
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("roles", sa.String(200), nullable=False),
        sa.Column("heartbeat", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("nodes")
    with op.batch_alter_table("recipients", schema=None) as batch_op:
        batch_op.drop_column("lease_expires")
        batch_op.drop_column("lease")
