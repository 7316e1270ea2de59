"""Read-side queries: jobs, the users' lines, queue positions, load, recovery candidates.

Nothing here changes a row (`shared/jobs/transitions.py` owns every change). No
query reads the whole queue: the fair order and a job's place in it come from
one row per active user (`user_queues`) plus indexed reads of single jobs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import (
    select,
)
from sqlalchemy.orm import Session

from shared.accounts.users import Principal
from shared.clock import database_now
from shared.errors import JobNotFound, ResultsExpired
from shared.models import (
    LIVE_DEADLINE,
    RELEASED,
    RETAINED,
    RUNNING,
    TERMINAL_STATES,
    Job,
    JobImage,
    JobState,
)

PUBLIC_STATUS: Final = {
    JobState.QUEUED: "QUEUED",
    JobState.RUNNING: "PROCESSING",
    JobState.COMPLETED: "COMPLETED",
    JobState.FAILED: "FAILED",
    JobState.CANCELLED: "FAILED",
}


def get_job(session: Session, principal: Principal, job_id: str) -> Job:
    """A job of the caller's tenant; any other job is indistinguishable from a missing one."""
    if "\x00" in job_id:
        # No id holds a NUL; PostgreSQL would refuse the query rather than find nothing.
        raise JobNotFound(job_id)
    job = session.execute(
        select(Job).where(Job.id == job_id, Job.tenant_id == principal.tenant_id)
    ).scalar_one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def job_state(session: Session, job_id: str) -> JobState:
    """A job's current state, read fresh."""
    return JobState(session.execute(select(Job.state).where(Job.id == job_id)).scalar_one())


def attempt_holds(session: Session, job_id: str, attempt: int) -> bool:
    """Whether `attempt` still holds the running job (its claim not given to another)."""
    held = session.scalar(
        select(Job.id).where(
            Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING.value
        )
    )
    return held is not None


def public_status(job: Job) -> str:
    """Segmind's four states: QUEUED, PROCESSING, COMPLETED, FAILED."""
    return PUBLIC_STATUS[JobState(job.state)]


def results_expired(job: Job, now: datetime) -> bool:
    """Whether the job's results are past their retention at `now` (the database's time)."""
    if job.results_deleted_at is not None:
        return True
    return job.expires_at is not None and job.expires_at <= now


def ensure_results_retained(job: Job, now: datetime) -> None:
    """ResultsExpired unless the job's results may still be served at `now` (the database's)."""
    if results_expired(job, now):
        expired = job.expires_at.isoformat() if job.expires_at else "earlier"
        raise ResultsExpired(
            f"The results of request {job.id} expired at {expired} and were deleted"
        )


def expired_results(session: Session, limit: int) -> dict[str, list[str]]:
    """Up to `limit` ended jobs past retention whose results still exist, with their keys."""
    job_ids = list(
        session.scalars(
            select(Job.id)
            .where(
                RETAINED,
                Job.expires_at <= database_now(session),
                Job.state.in_([s.value for s in TERMINAL_STATES]),
            )
            .order_by(Job.expires_at)
            .limit(limit)
        )
    )
    keys: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
    for job_id, key in session.execute(
        select(JobImage.job_id, JobImage.storage_key).where(JobImage.job_id.in_(job_ids))
    ):
        keys[job_id].append(key)
    return keys


# ---------------------------------------------------------------- lines and the fair order


# ---------------------------------------------------------------- load and recovery


def stale_releases(session: Session, older_than: datetime, limit: int) -> list[str]:
    """Released, unclaimed jobs released before `older_than`, oldest first."""
    if limit <= 0:
        return []
    return list(
        session.execute(
            select(Job.id)
            .where(RELEASED, Job.released_at < older_than, Job.cancel_requested.is_(False))
            .order_by(Job.released_at, Job.id)
            .limit(limit)
        ).scalars()
    )


def expired_leases(session: Session, now: datetime, limit: int) -> list[str]:
    """RUNNING jobs whose lease lapsed before `now` (their worker stopped renewing)."""
    return list(
        session.execute(
            select(Job.id)
            .where(RUNNING, Job.lease_expires_at < now)
            .order_by(Job.lease_expires_at)
            .limit(limit)
        ).scalars()
    )


def claims_of(session: Session, workers: list[str], limit: int) -> list[str]:
    """RUNNING jobs claimed by any of `workers` (a read of the running jobs' index)."""
    return list(
        session.execute(
            select(Job.id).where(RUNNING, Job.worker.in_(workers)).order_by(Job.id).limit(limit)
        ).scalars()
    )


def past_deadline(session: Session, now: datetime, limit: int) -> list[str]:
    """QUEUED jobs whose deadline passed."""
    return list(
        session.execute(
            select(Job.id)
            .where(
                LIVE_DEADLINE,
                Job.state == JobState.QUEUED.value,
                Job.deadline_at < now,
            )
            .order_by(Job.deadline_at)
            .limit(limit)
        ).scalars()
    )
