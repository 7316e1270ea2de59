"""Scheduling: fair-share weights, dispatcher release time, client deadlines

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite cannot add a CHECK constraint in place, so it copies the table.
    for table in ("tenants", "users"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("weight", sa.Integer(), server_default="1", nullable=False)
            )
            batch.create_check_constraint(op.f(f"ck_{table}_weight_positive"), "weight >= 1")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("deadline_at")
        batch.drop_column("released_at")
    for table in ("users", "tenants"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"ck_{table}_weight_positive"), type_="check")
            batch.drop_column("weight")
