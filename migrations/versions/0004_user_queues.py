"""Scale: users' lines and tenants' queues, line numbers and sizes on jobs, partial indexes

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

WAITING_SQL = "state = 'QUEUED' AND released_at IS NULL"
RELEASED_SQL = "state = 'QUEUED' AND released_at IS NOT NULL"
RUNNING_SQL = "state = 'RUNNING'"
LIVE_DEADLINE_SQL = "state IN ('QUEUED', 'RUNNING') AND deadline_at IS NOT NULL"
RETAINED_SQL = "results_deleted_at IS NULL AND expires_at IS NOT NULL"
ACTIVE_LINE_SQL = "waiting > 0 OR in_flight > 0"
TENANT_WAITING_SQL = "waiting > 0"
TENANT_SINGLE_SQL = "waiting = 1"
TENANT_MULTI_SQL = "waiting > 1"

PARTIAL_INDEXES = (
    ("ix_jobs_waiting", "jobs", ["user_id", "queue_seq"], WAITING_SQL),
    ("ix_jobs_released", "jobs", ["released_at", "id"], RELEASED_SQL),
    ("ix_jobs_running", "jobs", ["lease_expires_at"], RUNNING_SQL),
    ("ix_jobs_live_deadline", "jobs", ["deadline_at"], LIVE_DEADLINE_SQL),
    ("ix_jobs_retained", "jobs", ["expires_at"], RETAINED_SQL),
    ("ix_user_queues_active", "user_queues", ["tenant_id"], ACTIVE_LINE_SQL),
    (
        "ix_tenant_queues_next",
        "tenant_queues",
        ["first_vt", "first_created_at", "first_job_id"],
        TENANT_WAITING_SQL,
    ),
    ("ix_tenant_queues_multi", "tenant_queues", ["first_vt"], TENANT_MULTI_SQL),
    (
        "ix_tenant_queues_single",
        "tenant_queues",
        ["first_vt", "first_created_at", "first_job_id", "waiting_work", "waiting"],
        TENANT_SINGLE_SQL,
    ),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queue_seq", sa.BigInteger(), server_default="0", nullable=False))
        batch.add_column(sa.Column("work", sa.BigInteger(), server_default="0", nullable=False))
        batch.drop_index("ix_jobs_expires_at")
        # Every read it served scanned the whole queue; the partial indexes replace it.
        batch.drop_index("ix_jobs_state_created_at")
    op.create_table(
        "user_queues",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("waiting", sa.Integer(), server_default="0", nullable=False),
        sa.Column("in_flight", sa.Integer(), server_default="0", nullable=False),
        sa.Column("waiting_work", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("head_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("head_job_id", sa.String(length=32), nullable=True),
        sa.Column("head_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("tail_job_id", sa.String(length=32), nullable=True),
        sa.Column("tail_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("waiting >= 0", name=op.f("ck_user_queues_waiting_non_negative")),
        sa.CheckConstraint(
            "in_flight >= 0", name=op.f("ck_user_queues_in_flight_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_user_queues_tenant_id_tenants")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_user_queues_user_id_users")
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_user_queues")),
    )
    op.create_index(op.f("ix_user_queues_tenant_id"), "user_queues", ["tenant_id"])
    op.create_table(
        "tenant_queues",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Integer(), server_default="1", nullable=False),
        sa.Column("waiting", sa.Integer(), server_default="0", nullable=False),
        sa.Column("in_flight", sa.Integer(), server_default="0", nullable=False),
        sa.Column("waiting_work", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("first_vt", sa.Float(), nullable=True),
        sa.Column("first_user_id", sa.Integer(), nullable=True),
        sa.Column("first_job_id", sa.String(length=32), nullable=True),
        sa.Column("first_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("oldest_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("newest_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("waiting >= 0", name=op.f("ck_tenant_queues_waiting_non_negative")),
        sa.CheckConstraint(
            "in_flight >= 0", name=op.f("ck_tenant_queues_in_flight_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_queues_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tenant_queues")),
    )
    # Weights bounded, so virtual times compare exactly as floats (see TenantQueue).
    for table in ("tenants", "users"):
        with op.batch_alter_table(table) as batch:
            batch.create_check_constraint(op.f(f"ck_{table}_weight_bounded"), "weight <= 10000")
    _backfill()
    for name, table, columns, where in PARTIAL_INDEXES:
        op.create_index(
            name, table, columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where)
        )


def _backfill() -> None:
    """Number every waiting job in its user's line and build each user's line row."""
    bind = op.get_bind()
    # A RUNNING job was always released; rows from before release times existed had none.
    bind.execute(
        sa.text(
            "UPDATE jobs SET released_at = COALESCE(started_at, created_at) "
            "WHERE state = 'RUNNING' AND released_at IS NULL"
        )
    )
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("user_id", sa.Integer),
        sa.column("state", sa.String),
        sa.column("released_at", sa.DateTime(timezone=True)),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("params", sa.JSON),
        sa.column("number_of_images", sa.Integer),
        sa.column("queue_seq", sa.BigInteger),
        sa.column("work", sa.BigInteger),
    )
    lines: dict[int, dict[str, Any]] = defaultdict(
        lambda: {"waiting": [], "in_flight": 0, "last": None}
    )
    rows = bind.execute(
        sa.select(
            jobs.c.id,
            jobs.c.user_id,
            jobs.c.state,
            jobs.c.released_at,
            jobs.c.created_at,
            jobs.c.params,
            jobs.c.number_of_images,
        ).order_by(jobs.c.user_id, jobs.c.created_at, jobs.c.id)
    )
    for row in rows:
        line = lines[row.user_id]
        line["last"] = row.created_at
        if row.state not in ("QUEUED", "RUNNING"):
            continue
        params = row.params or {}
        work = (
            int(params.get("width", 0))
            * int(params.get("height", 0))
            * int(params.get("steps", 0))
            * row.number_of_images
        )
        bind.execute(sa.update(jobs).where(jobs.c.id == row.id).values(work=work))
        if row.state == "QUEUED" and row.released_at is None:
            line["waiting"].append((row.id, row.created_at, work))
        else:
            line["in_flight"] += 1
    users = bind.execute(sa.text("SELECT id, tenant_id FROM users")).all()
    user_queues = sa.table(
        "user_queues",
        *(
            sa.column(name)
            for name in (
                "user_id",
                "tenant_id",
                "waiting",
                "in_flight",
                "waiting_work",
                "head_seq",
                "head_job_id",
                "head_created_at",
                "tail_job_id",
                "tail_created_at",
                "last_created_at",
            )
        ),
    )
    for user_id, tenant_id in users:
        line = lines.get(user_id, {"waiting": [], "in_flight": 0, "last": None})
        waiting = line["waiting"]
        for seq, (job_id, _created, _work) in enumerate(waiting):
            bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(queue_seq=seq))
        bind.execute(
            sa.insert(user_queues).values(
                user_id=user_id,
                tenant_id=tenant_id,
                waiting=len(waiting),
                in_flight=line["in_flight"],
                waiting_work=sum(work for _id, _created, work in waiting),
                head_seq=0,
                head_job_id=waiting[0][0] if waiting else None,
                head_created_at=waiting[0][1] if waiting else None,
                tail_job_id=waiting[-1][0] if waiting else None,
                tail_created_at=waiting[-1][1] if waiting else None,
                last_created_at=line["last"],
            )
        )
    _backfill_tenants(bind)


def _backfill_tenants(bind: sa.engine.Connection) -> None:
    """Each tenant's queue, summed from its users' lines (as shared.scheduling.lines keeps it)."""
    tenants = bind.execute(sa.text("SELECT id, weight FROM tenants")).all()
    for tenant_id, weight in tenants:
        sums = bind.execute(
            sa.text(
                "SELECT COALESCE(SUM(waiting), 0), COALESCE(SUM(in_flight), 0), "
                "COALESCE(SUM(waiting_work), 0), MIN(head_created_at), MAX(tail_created_at) "
                "FROM user_queues WHERE tenant_id = :t"
            ),
            {"t": tenant_id},
        ).one()
        waiting, in_flight, work, oldest, newest = sums
        first = bind.execute(
            sa.text(
                "SELECT uq.user_id, uq.head_job_id, uq.head_created_at FROM user_queues uq "
                "JOIN users u ON u.id = uq.user_id WHERE uq.tenant_id = :t AND uq.waiting > 0 "
                "ORDER BY CAST(uq.in_flight + 1 AS FLOAT) / u.weight, uq.head_created_at, "
                "uq.head_job_id LIMIT 1"
            ),
            {"t": tenant_id},
        ).first()
        bind.execute(
            sa.text(
                "INSERT INTO tenant_queues (tenant_id, weight, waiting, in_flight, waiting_work, "
                "first_vt, first_user_id, first_job_id, first_created_at, oldest_created_at, "
                "newest_created_at) VALUES (:t, :w, :n, :a, :work, :vt, :fu, :fj, :fc, :o, :nw)"
            ),
            {
                "t": tenant_id,
                "w": weight,
                "n": waiting,
                "a": in_flight,
                "work": work,
                "vt": (in_flight + 1) / weight if waiting else None,
                "fu": first[0] if first else None,
                "fj": first[1] if first else None,
                "fc": first[2] if first else None,
                "o": oldest if waiting else None,
                "nw": newest if waiting else None,
            },
        )


def downgrade() -> None:
    for name, table, _columns, _where in reversed(PARTIAL_INDEXES):
        op.drop_index(name, table_name=table)
    for table in ("users", "tenants"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"ck_{table}_weight_bounded"), type_="check")
    op.drop_table("tenant_queues")
    op.drop_index(op.f("ix_user_queues_tenant_id"), table_name="user_queues")
    op.drop_table("user_queues")
    with op.batch_alter_table("jobs") as batch:
        batch.create_index("ix_jobs_expires_at", ["expires_at"])
        batch.create_index("ix_jobs_state_created_at", ["state", "created_at"])
        batch.drop_column("work")
        batch.drop_column("queue_seq")
