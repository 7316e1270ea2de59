"""Surface: admins, key use times, history indexes and the daily usage rollup

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("is_admin", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_api_keys_prefix", ["prefix"])
    op.create_index("ix_jobs_tenant_history", "jobs", ["tenant_id", "created_at", "id"])
    op.create_index(
        "ix_jobs_tenant_state_history", "jobs", ["tenant_id", "state", "created_at", "id"]
    )
    op.create_table(
        "usage_days",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("granted", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("held", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("captured", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("released", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_usage_days_tenant_id_tenants")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_usage_days_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_days")),
        sa.UniqueConstraint("user_id", "day", name="uq_usage_days_user_id_day"),
    )
    op.create_index("ix_usage_days_tenant_day", "usage_days", ["tenant_id", "day", "user_id"])
    _backfill_usage()


def _backfill_usage() -> None:
    """Roll the existing ledger up by user and UTC day."""
    bind = op.get_bind()
    day = (
        "CAST(ledger_entries.created_at AT TIME ZONE 'UTC' AS DATE)"
        if bind.dialect.name == "postgresql"
        else "date(ledger_entries.created_at)"
    )
    op.execute(
        f"""
        INSERT INTO usage_days (tenant_id, user_id, day, granted, held, captured, released)
        SELECT users.tenant_id, ledger_entries.user_id, {day},
               SUM(CASE WHEN kind = 'grant' THEN available_delta ELSE 0 END),
               SUM(CASE WHEN kind = 'hold' THEN held_delta ELSE 0 END),
               SUM(CASE WHEN kind = 'capture' THEN -held_delta ELSE 0 END),
               SUM(CASE WHEN kind = 'release' THEN available_delta ELSE 0 END)
        FROM ledger_entries JOIN users ON users.id = ledger_entries.user_id
        GROUP BY users.tenant_id, ledger_entries.user_id, {day}
        """  # noqa: S608 - no user input; the day expression is one of two literals
    )


def downgrade() -> None:
    op.drop_index("ix_usage_days_tenant_day", table_name="usage_days")
    op.drop_table("usage_days")
    op.drop_index("ix_jobs_tenant_state_history", table_name="jobs")
    op.drop_index("ix_jobs_tenant_history", table_name="jobs")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_index("ix_api_keys_prefix")
        batch.drop_column("last_used_at")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("is_admin")
