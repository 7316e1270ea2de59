"""Results: retention expiry, deletion time, and each image's generation record

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("results_deleted_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.create_index(op.f("ix_jobs_expires_at"), ["expires_at"])
    with op.batch_alter_table("job_images") as batch:
        batch.add_column(sa.Column("generation", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_images") as batch:
        batch.drop_column("generation")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(op.f("ix_jobs_expires_at"))
        batch.drop_column("results_deleted_at")
        batch.drop_column("expires_at")
