"""SQLAlchemy 2.0 typed models: tenants, users, API keys, jobs, images and the credit ledger."""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any, ClassVar, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on SQLite as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Store aware datetimes as UTC; refuse naive ones."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use shared.models.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return aware UTC datetimes."""
        if value is None:
            return None
        # SQLite keeps no zone; every value was written as UTC.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with stable constraint names (Alembic needs them)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        dict[str, Any] | None: JSON(),
    }


class JobState(enum.StrEnum):
    """A job's lifecycle; only QUEUED and RUNNING are live."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


LIVE_STATES = (JobState.QUEUED, JobState.RUNNING)
TERMINAL_STATES = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)

# The predicates of the partial indexes, shared with the migration that creates them.
# A QUEUED job waits in line until the dispatcher releases it (released_at set).
WAITING_SQL = "state = 'QUEUED' AND released_at IS NULL"
RELEASED_SQL = "state = 'QUEUED' AND released_at IS NOT NULL"
RUNNING_SQL = "state = 'RUNNING'"
LIVE_DEADLINE_SQL = "state IN ('QUEUED', 'RUNNING') AND deadline_at IS NOT NULL"
RETAINED_SQL = "results_deleted_at IS NULL AND expires_at IS NOT NULL"
ACTIVE_LINE_SQL = "waiting > 0 OR in_flight > 0"
TENANT_WAITING_SQL = "waiting > 0"
TENANT_SINGLE_SQL = "waiting = 1"
TENANT_MULTI_SQL = "waiting > 1"
CACHEABLE_SQL = "cache_key IS NOT NULL"
DELIVERY_PENDING_SQL = "state = 'pending'"
# Fair-share weights stay below this so virtual times compare exactly as floats.
MAX_WEIGHT = 10_000


class LedgerKind(enum.StrEnum):
    """What a ledger entry records."""

    GRANT = "grant"
    HOLD = "hold"
    CAPTURE = "capture"
    RELEASE = "release"


def _in_check(column: str, values: type[enum.StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Tenant(Base):
    """A team; its users share visibility of each other's jobs."""

    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("weight >= 1", name="weight_positive"),
        CheckConstraint("weight <= 10000", name="weight_bounded"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # Fair-share weight against other tenants: a tenant of weight 2 gets twice the renders.
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    users: Mapped[list[User]] = relationship(back_populates="tenant")


class User(Base):
    """A caller with API keys and a credit balance (in millicredits)."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("balance >= 0", name="balance_non_negative"),
        CheckConstraint("weight >= 1", name="weight_positive"),
        CheckConstraint("weight <= 10000", name="weight_bounded"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # Fair-share weight against the other users of the same tenant.
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Cached sum of the ledger's available_delta; changed only by conditional UPDATEs.
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    # Operators see the whole farm in the console and may grant credits.
    is_admin: Mapped[bool] = mapped_column(default=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    tenant: Mapped[Tenant] = relationship(back_populates="users")


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the secret; the prefix is for display."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # Updated at most once a minute per key, so authentication stays a read.
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    """One render request: its parameters, state, fencing attempt and settlement inputs."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in_check("state", JobState), name="state_valid"),
        CheckConstraint("number_of_images BETWEEN 1 AND 10", name="image_count_valid"),
        CheckConstraint(
            "images_done >= 0 AND images_done <= number_of_images", name="images_done_valid"
        ),
        CheckConstraint("attempt >= 0", name="attempt_non_negative"),
        # Partial indexes: each serves one scheduling read without touching the jobs
        # that wait in line (there may be millions) or the history.
        Index(
            "ix_jobs_waiting",
            "user_id",
            "queue_seq",
            postgresql_where=text(WAITING_SQL),
            sqlite_where=text(WAITING_SQL),
        ),
        Index(
            "ix_jobs_released",
            "released_at",
            "id",
            postgresql_where=text(RELEASED_SQL),
            sqlite_where=text(RELEASED_SQL),
        ),
        Index(
            "ix_jobs_running",
            "lease_expires_at",
            postgresql_where=text(RUNNING_SQL),
            sqlite_where=text(RUNNING_SQL),
        ),
        Index(
            "ix_jobs_live_deadline",
            "deadline_at",
            postgresql_where=text(LIVE_DEADLINE_SQL),
            sqlite_where=text(LIVE_DEADLINE_SQL),
        ),
        # A tenant's history, newest first, whole or by state (keyset-paginated).
        Index("ix_jobs_tenant_history", "tenant_id", "created_at", "id"),
        Index("ix_jobs_tenant_state_history", "tenant_id", "state", "created_at", "id"),
        Index(
            "ix_jobs_retained",
            "expires_at",
            postgresql_where=text(RETAINED_SQL),
            sqlite_where=text(RETAINED_SQL),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    params: Mapped[dict[str, Any]]
    seed: Mapped[int] = mapped_column(BigInteger)
    number_of_images: Mapped[int] = mapped_column(Integer)
    images_done: Mapped[int] = mapped_column(Integer, default=0)
    price_per_image: Mapped[int] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set when the dispatcher hands the job to the broker; NULL while it waits its turn.
    released_at: Mapped[datetime | None] = mapped_column(default=None)
    # A client's deadline: past it a queued job is cancelled, a running one stops.
    deadline_at: Mapped[datetime | None] = mapped_column(default=None)
    # Results are kept until then (counted from submission); cleanup deletes them after.
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    results_deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    # Place in its user's line while it waits: the user's waiting jobs hold the
    # consecutive numbers head_seq .. head_seq + waiting - 1 (see UserQueue).
    queue_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Size in pixel-steps (width x height x steps x images), for the ETA.
    work: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Where to POST the request's events (Standard Webhooks), and which: "completed",
    # "start" or "start,completed".
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_events: Mapped[str | None] = mapped_column(String(32), default=None)

    images: Mapped[list[JobImage]] = relationship(order_by="JobImage.index", back_populates="job")


class UserQueue(Base):
    """One user's line, maintained with every job transition in the same transaction.

    `waiting` counts QUEUED jobs not yet released, which hold the consecutive
    `queue_seq` numbers head_seq .. head_seq + waiting - 1 in first-in, first-out
    order; `in_flight` counts released and RUNNING jobs. The head and tail are the
    first and last waiting jobs. So the fair-share order and a job's place in it
    are computed from one row per active user, whatever the depth of the queue.
    """

    __tablename__ = "user_queues"
    __table_args__ = (
        CheckConstraint("waiting >= 0", name="waiting_non_negative"),
        CheckConstraint("in_flight >= 0", name="in_flight_non_negative"),
        Index(
            "ix_user_queues_active",
            "tenant_id",
            postgresql_where=text(ACTIVE_LINE_SQL),
            sqlite_where=text(ACTIVE_LINE_SQL),
        ),
    )

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    waiting: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    in_flight: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    waiting_work: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    head_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    head_job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    head_created_at: Mapped[datetime | None] = mapped_column(default=None)
    tail_job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    tail_created_at: Mapped[datetime | None] = mapped_column(default=None)
    # The newest job's submission time: a user's jobs get strictly increasing times,
    # so first in, first out by time is also the order of submission.
    last_created_at: Mapped[datetime | None] = mapped_column(default=None)


class TenantQueue(Base):
    """One tenant's queue: its users' lines summed, and the tenant's next job.

    Kept with its lines (`shared.scheduling.lines`), in the same transaction. The tenant's next
    job is the one the fair order takes next from this tenant; `first_vt` is its
    tenant-level virtual time (in_flight + 1) / weight, as a float: with weights of at
    most 10,000 distinct virtual times never round to the same float, so ordering
    and comparing by it is exact.
    """

    __tablename__ = "tenant_queues"
    __table_args__ = (
        CheckConstraint("waiting >= 0", name="waiting_non_negative"),
        CheckConstraint("in_flight >= 0", name="in_flight_non_negative"),
        Index(
            "ix_tenant_queues_next",
            "first_vt",
            "first_created_at",
            "first_job_id",
            postgresql_where=text(TENANT_WAITING_SQL),
            sqlite_where=text(TENANT_WAITING_SQL),
        ),
        Index(
            "ix_tenant_queues_multi",
            "first_vt",
            postgresql_where=text(TENANT_MULTI_SQL),
            sqlite_where=text(TENANT_MULTI_SQL),
        ),
        # Covers the count and the work of the single-job tenants ahead of a job.
        Index(
            "ix_tenant_queues_single",
            "first_vt",
            "first_created_at",
            "first_job_id",
            "waiting_work",
            "waiting",
            postgresql_where=text(TENANT_SINGLE_SQL),
            sqlite_where=text(TENANT_SINGLE_SQL),
        ),
    )

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    # The tenant's weight, kept here with the counts it divides.
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    waiting: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    in_flight: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    waiting_work: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    first_vt: Mapped[float | None] = mapped_column(Float, default=None)
    first_user_id: Mapped[int | None] = mapped_column(Integer, default=None)
    first_job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    first_created_at: Mapped[datetime | None] = mapped_column(default=None)
    # The oldest and newest waiting jobs' submission times, whoever's they are.
    oldest_created_at: Mapped[datetime | None] = mapped_column(default=None)
    newest_created_at: Mapped[datetime | None] = mapped_column(default=None)


class JobImage(Base):
    """One delivered image of a job, stored under `storage_key`."""

    __tablename__ = "job_images"
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_job_images_job_id_index"),
        Index(
            "ix_job_images_cache_key",
            "cache_key",
            postgresql_where=text(CACHEABLE_SQL),
            sqlite_where=text(CACHEABLE_SQL),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(500))
    content_type: Mapped[str] = mapped_column(String(50))
    size_bytes: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    # The generation record embedded in the image's metadata (see shared/jobs/imaging.py).
    generation: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # SHA-256 of the rendering inputs (parameters, seed, weights, library versions), set
    # on rendered images so an identical request can be answered from storage.
    cache_key: Mapped[str | None] = mapped_column(String(64), default=None)
    # True when this image was answered from the result cache, not rendered.
    cached: Mapped[bool] = mapped_column(default=False, server_default=text("false"))

    job: Mapped[Job] = relationship(back_populates="images")


class LedgerEntry(Base):
    """An append-only credit movement, in millicredits.

    `available_delta` changes the spendable balance; `held_delta` changes the
    amount held for a job. Grant: (+c, 0). Hold: (-p, +p). Capture: (0, -c).
    Release: (+r, -r). So a user's balance is the sum of available_delta and a
    job's outstanding hold is the sum of its held_delta.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (CheckConstraint(_in_check("kind", LedgerKind), name="kind_valid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True, default=None)
    kind: Mapped[str] = mapped_column(String(16))
    available_delta: Mapped[int] = mapped_column(BigInteger)
    held_delta: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsageDay(Base):
    """One user's credit movements on one UTC day, kept with every ledger entry.

    Summing the ledger for a report would read every entry of the period; this
    rollup makes a tenant's usage one index range per day, however many jobs ran.
    """

    __tablename__ = "usage_days"
    __table_args__ = (
        UniqueConstraint("user_id", "day", name="uq_usage_days_user_id_day"),
        Index("ix_usage_days_tenant_day", "tenant_id", "day", "user_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    day: Mapped[date] = mapped_column(Date)
    granted: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    held: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    captured: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    released: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class WebhookSecret(Base):
    """A tenant's webhook signing secret (`whsec_...`); a rotated one signs until `expires_at`."""

    __tablename__ = "webhook_secrets"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookDelivery(Base):
    """One event of one request to deliver to its webhook; `id` is the stable `webhook-id`."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text(DELIVERY_PENDING_SQL),
            sqlite_where=text(DELIVERY_PENDING_SQL),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    event: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(Text)
    # pending, delivered, failed (gave up or not retryable), disabled (the URL answered 410)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery: when, how long, what came back."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)
    latency_ms: Mapped[int | None] = mapped_column(Integer, default=None)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(String(500), default=None)


class DisabledWebhook(Base):
    """A URL that answered 410 Gone: no more deliveries to it for this tenant."""

    __tablename__ = "disabled_webhooks"
    __table_args__ = (
        UniqueConstraint("tenant_id", "url_hash", name="uq_disabled_webhooks_tenant_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    url_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 hex of the URL
    url: Mapped[str] = mapped_column(Text)
    disabled_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """A client's `Idempotency-Key` for one submission, scoped per user, kept until `expires_at`."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    key: Mapped[str] = mapped_column(String(255))
    # SHA-256 hex of the request (route and body) the key was first used with.
    fingerprint: Mapped[str] = mapped_column(String(64))
    # NULL while the first request is still being created.
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


# Literal predicates (not bound parameters), so SQLite and PostgreSQL both match them
# to the partial indexes of the same text; parenthesized, as text is not grouped.
WAITING: Final = text(f"({WAITING_SQL})")
RELEASED: Final = text(f"({RELEASED_SQL})")
RUNNING: Final = text(f"({RUNNING_SQL})")
ACTIVE_LINE: Final = text(f"({ACTIVE_LINE_SQL})")
RETAINED: Final = text(f"({RETAINED_SQL})")
LIVE_DEADLINE: Final = text(f"({LIVE_DEADLINE_SQL})")
TENANT_WAITING: Final = text(f"({TENANT_WAITING_SQL})")
