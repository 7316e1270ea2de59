"""The scheduler's database side: release jobs in fair-share order, and recover from faults.

A QUEUED job with `released_at` NULL waits in SQL; the dispatcher releases a
few at a time (about the free worker slots) by setting `released_at` with a
conditional UPDATE and then publishing a message. A worker's claim turns it
RUNNING with a lease. The reconciler functions below repair what faults leave
behind: releases whose message was lost, leases that expired, deadlines that
passed. Each is a conditional UPDATE, so two dispatchers racing are harmless.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from shared.fairshare import QueuedJob, ShareState, fair_order, pick_for_release
from shared.ledger import release_hold
from shared.models import Job, JobState, Tenant, User, utcnow

ONE_MEGA_STEP = 1024 * 1024  # the work unit: one 1024x1024 image at one step


def job_work(params: dict[str, Any], images: int) -> float:
    """A job's size in work units (1024x1024 images x steps)."""
    pixels = int(params["width"]) * int(params["height"])
    return pixels * int(params["steps"]) * images / ONE_MEGA_STEP


_QUEUED_UNRELEASED = and_(
    Job.state == JobState.QUEUED.value,
    Job.released_at.is_(None),
    Job.cancel_requested.is_(False),
)
_IN_FLIGHT = or_(
    Job.state == JobState.RUNNING.value,
    and_(Job.state == JobState.QUEUED.value, Job.released_at.is_not(None)),
)


def queue_snapshot(session: Session) -> tuple[list[QueuedJob], ShareState]:
    """The jobs waiting for release, and what is in flight per tenant and user."""
    rows = session.execute(
        select(
            Job.id,
            Job.tenant_id,
            Job.user_id,
            Job.created_at,
            Job.params,
            Job.number_of_images,
        ).where(_QUEUED_UNRELEASED)
    ).all()
    jobs = [
        QueuedJob(
            job_id=row.id,
            tenant_id=row.tenant_id,
            user_id=row.user_id,
            created_at=row.created_at,
            work=job_work(row.params, row.number_of_images),
        )
        for row in rows
    ]
    flying = session.execute(select(Job.tenant_id, Job.user_id).where(_IN_FLIGHT)).all()
    tenant_ids = {job.tenant_id for job in jobs} | {row.tenant_id for row in flying}
    user_ids = {job.user_id for job in jobs} | {row.user_id for row in flying}
    tenant_weight = {
        row.id: row.weight
        for row in session.execute(
            select(Tenant.id, Tenant.weight).where(Tenant.id.in_(tenant_ids))
        )
    }
    user_weight = {
        row.id: row.weight
        for row in session.execute(select(User.id, User.weight).where(User.id.in_(user_ids)))
    }
    state = ShareState(
        tenant_active=Counter(row.tenant_id for row in flying),
        user_active=Counter(row.user_id for row in flying),
        tenant_weight=tenant_weight,
        user_weight=user_weight,
    )
    return jobs, state


@dataclass(frozen=True)
class Load:
    """How busy the farm is: jobs rendering, and jobs released but not yet claimed."""

    running: int
    released: int


def current_load(session: Session) -> Load:
    """Count RUNNING jobs and released, unclaimed QUEUED jobs."""
    counts: dict[str, int] = {
        state: count
        for state, count in session.execute(
            select(Job.state, func.count()).where(_IN_FLIGHT).group_by(Job.state)
        )
    }
    return Load(
        running=counts.get(JobState.RUNNING.value, 0),
        released=counts.get(JobState.QUEUED.value, 0),
    )


def release_next_jobs(session: Session, slots: int, max_running_per_user: int) -> list[str]:
    """Mark up to `slots` jobs released, in fair-share order; return their ids."""
    if slots <= 0:
        return []
    jobs, state = queue_snapshot(session)
    picked = pick_for_release(fair_order(jobs, state), slots, state, max_running_per_user)
    now = utcnow()
    released: list[str] = []
    for job in picked:
        marked = session.execute(
            update(Job)
            .where(Job.id == job.job_id, _QUEUED_UNRELEASED)
            .values(released_at=now)
            .returning(Job.id)
        ).scalar_one_or_none()
        if marked is not None:
            released.append(marked)
    return released


def unrelease_job(session: Session, job_id: str) -> None:
    """Put a released job back in line (its message could not be published)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED.value)
        .values(released_at=None)
    )


def stale_releases(session: Session, older_than: datetime, limit: int) -> list[str]:
    """Released, unclaimed jobs released before `older_than`, oldest first."""
    if limit <= 0:
        return []
    return list(
        session.execute(
            select(Job.id)
            .where(
                Job.state == JobState.QUEUED.value,
                Job.released_at.is_not(None),
                Job.released_at < older_than,
                Job.cancel_requested.is_(False),
            )
            .order_by(Job.released_at, Job.id)
            .limit(limit)
        ).scalars()
    )


def touch_release(session: Session, job_id: str) -> None:
    """Restart a released job's clock after its message was published again."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED.value)
        .values(released_at=utcnow())
    )


@dataclass(frozen=True)
class LeaseOutcome:
    """What recovery did with a job whose lease expired: QUEUED, FAILED or CANCELLED."""

    job_id: str
    attempt: int
    state: JobState

    @property
    def requeued(self) -> bool:
        """Whether the job went back in line for another attempt."""
        return self.state == JobState.QUEUED


def recover_expired_leases(session: Session, max_attempts: int) -> list[LeaseOutcome]:
    """Settle RUNNING jobs whose lease expired: requeue, fail or cancel them.

    A job is failed once it has used `max_attempts`, and ends CANCELLED when a cancel
    (or its deadline) arrived before its worker died.
    """
    now = utcnow()
    expired = session.execute(
        select(Job.id, Job.attempt, Job.user_id, Job.cancel_requested).where(
            Job.state == JobState.RUNNING.value, Job.lease_expires_at < now
        )
    ).all()
    outcomes: list[LeaseOutcome] = []
    for row in expired:
        still_expired = (
            Job.id == row.id,
            Job.attempt == row.attempt,
            Job.state == JobState.RUNNING.value,
            Job.lease_expires_at < now,
        )
        if row.cancel_requested:
            ended = session.execute(
                update(Job)
                .where(*still_expired)
                .values(state=JobState.CANCELLED.value, finished_at=now, lease_expires_at=None)
                .returning(Job.id)
            ).scalar_one_or_none()
            if ended is not None:
                release_hold(session, row.user_id, row.id)
                outcomes.append(LeaseOutcome(row.id, row.attempt, JobState.CANCELLED))
            continue
        if row.attempt >= max_attempts:
            error = (
                f"The render was lost {row.attempt} times (its worker stopped); "
                "the credits for undelivered images were released"
            )
            failed = session.execute(
                update(Job)
                .where(*still_expired)
                .values(
                    state=JobState.FAILED.value,
                    error=error,
                    finished_at=now,
                    lease_expires_at=None,
                )
                .returning(Job.id)
            ).scalar_one_or_none()
            if failed is not None:
                release_hold(session, row.user_id, row.id)
                outcomes.append(LeaseOutcome(row.id, row.attempt, JobState.FAILED))
            continue
        requeued = session.execute(
            update(Job)
            .where(*still_expired, Job.cancel_requested.is_(False))
            .values(
                state=JobState.QUEUED.value,
                worker=None,
                lease_expires_at=None,
                released_at=None,
            )
            .returning(Job.id)
        ).scalar_one_or_none()
        if requeued is not None:
            outcomes.append(LeaseOutcome(row.id, row.attempt, JobState.QUEUED))
    return outcomes


@dataclass(frozen=True)
class DeadlineOutcome:
    """Jobs whose deadline passed: queued ones were cancelled, running ones must stop."""

    cancelled: list[str]
    running: list[str]


DEADLINE_ERROR = "The request's deadline passed; undelivered images were not charged"


def enforce_deadlines(session: Session) -> DeadlineOutcome:
    """Cancel queued jobs past their deadline; flag running ones to stop."""
    now = utcnow()
    queued = session.execute(
        update(Job)
        .where(Job.state == JobState.QUEUED.value, Job.deadline_at < now)
        .values(
            state=JobState.CANCELLED.value,
            cancel_requested=True,
            error=DEADLINE_ERROR,
            finished_at=now,
        )
        .returning(Job.id, Job.user_id)
    ).all()
    for row in queued:
        release_hold(session, row.user_id, row.id)
    running = session.execute(
        update(Job)
        .where(
            Job.state == JobState.RUNNING.value,
            Job.deadline_at < now,
            Job.cancel_requested.is_(False),
        )
        .values(cancel_requested=True, error=DEADLINE_ERROR)
        .returning(Job.id)
    ).scalars()
    return DeadlineOutcome(cancelled=[row.id for row in queued], running=list(running))


@dataclass(frozen=True)
class QueuePlace:
    """Where a queued job stands: how many go before it, and their work."""

    position: int
    work_ahead: float


def queue_place(session: Session, job: Job) -> QueuePlace:
    """The job's place in the order the dispatcher will follow (0: next)."""
    conditions = [
        Job.state == JobState.QUEUED.value,
        Job.released_at.is_not(None),
        Job.cancel_requested.is_(False),
        Job.id != job.id,
    ]
    if job.released_at is not None:
        conditions.append(
            or_(
                Job.released_at < job.released_at,
                and_(Job.released_at == job.released_at, Job.id < job.id),
            )
        )
    released_ahead = session.execute(
        select(Job.id, Job.params, Job.number_of_images).where(*conditions)
    ).all()
    position = len(released_ahead)
    work_ahead = sum(job_work(row.params, row.number_of_images) for row in released_ahead)
    if job.released_at is None:
        jobs, state = queue_snapshot(session)
        for queued in fair_order(jobs, state):
            if queued.job_id == job.id:
                break
            position += 1
            work_ahead += queued.work
    return QueuePlace(position=position, work_ahead=work_ahead)


def estimate_wait_seconds(
    work_before: float, own_work: float, seconds_per_unit: list[float], workers: int
) -> float | None:
    """Seconds until a job finishes: the work before it spread over the workers, then its own.

    None while no worker has measured its speed yet.
    """
    if not seconds_per_unit:
        return None
    speed = sum(seconds_per_unit) / len(seconds_per_unit)
    return (work_before / max(1, workers) + own_work) * speed
