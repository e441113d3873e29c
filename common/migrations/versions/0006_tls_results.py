"""outbound TLS sessions counted for the daily TLS-RPT reports (RFC 8460)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 10:00:00

The queue manager counts every new session to a remote MX host under the TLS
policy it was made under (MTA-STS, DANE, none) and its result, and saves the
counts here every minute; once a day ends, each recipient domain that asks
for reports gets one and its rows are deleted (mta/tlsrpt.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tls_results",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("policy_domain", sa.String(255), nullable=False),
        sa.Column("policy_type", sa.String(16), nullable=False),
        sa.Column("policy_string", sa.Text(), nullable=False),
        sa.Column("mx_host", sa.Text(), nullable=False),
        sa.Column("result", sa.String(32), nullable=False),
        sa.Column("receiving_mx", sa.String(255), nullable=False),
        sa.Column("receiving_ip", sa.String(64), nullable=False),
        sa.Column("sending_ip", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
    )
    op.create_index("ix_tls_results_day", "tls_results", ["day"])


def downgrade() -> None:
    op.drop_index("ix_tls_results_day", table_name="tls_results")
    op.drop_table("tls_results")
