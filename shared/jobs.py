"""Job lifecycle: submit, claim, deliver images, finish, fail, cancel.

Every state change is a conditional UPDATE on the job row, and every write a
worker makes carries the attempt number it claimed with (a fencing token), so a
redelivered or stale message can never deliver, charge or settle twice. Ledger
movements follow the job-row UPDATE in the same transaction; the row lock it
takes (PostgreSQL) or the write lock (SQLite) orders concurrent settlements.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from shared.accounts import Principal
from shared.errors import JobNotFound, ResultsExpired, StaleAttempt, TooManyJobs
from shared.ledger import capture_image_credit, hold_credits, release_hold
from shared.models import LIVE_STATES, TERMINAL_STATES, Job, JobImage, JobState, utcnow
from shared.params import EXTENSIONS, MAX_SEED, RANDOM_SEED, KolorsParams
from shared.pricing import price_per_image

PUBLIC_STATUS = {
    JobState.QUEUED: "QUEUED",
    JobState.RUNNING: "PROCESSING",
    JobState.COMPLETED: "COMPLETED",
    JobState.FAILED: "FAILED",
    JobState.CANCELLED: "FAILED",
}

# A rendered job whose cancel arrived mid-render ends CANCELLED, keeping what it delivered.
_FINISHED_STATE = case(
    (Job.cancel_requested.is_(True), JobState.CANCELLED.value), else_=JobState.COMPLETED.value
)


@dataclass(frozen=True)
class RenderSpec:
    """What a worker needs to render a claimed job; a snapshot, free of any session."""

    job_id: str
    tenant_id: int
    attempt: int
    params: KolorsParams
    seed: int
    delivered: frozenset[int]
    deadline_at: datetime | None = None

    def image_seed(self, index: int) -> int:
        """The seed of image `index` (base seed + index, modulo 2^32)."""
        return (self.seed + index) % (MAX_SEED + 1)

    def pending_indices(self) -> list[int]:
        """Image indices not yet delivered by an earlier attempt."""
        return [i for i in range(self.params.number_of_images) if i not in self.delivered]


def new_job_id() -> str:
    """A new, unguessable job id."""
    return uuid.uuid4().hex


def resolve_seed(requested: int) -> int:
    """The base seed a job will use: the requested one, or a random one for -1."""
    return secrets.randbelow(MAX_SEED + 1) if requested == RANDOM_SEED else requested


def image_storage_key(tenant_id: int, job_id: str, index: int, output_format: str) -> str:
    """Deterministic object key of a job's image, so a redelivered upload overwrites."""
    return f"{tenant_id}/{job_id}/{index}.{EXTENSIONS[output_format]}"


def submit_job(
    session: Session,
    principal: Principal,
    params: KolorsParams,
    reference_price: Decimal,
    *,
    max_live_jobs: int | None = None,
    deadline: timedelta | None = None,
    retention: timedelta | None = None,
) -> Job:
    """Record a QUEUED job and hold its full price.

    NotEnoughCredits or TooManyJobs roll the caller's transaction back, so a
    refused request leaves nothing behind.
    """
    unit_price = price_per_image(params.width, params.height, params.steps, reference_price)
    now = utcnow()
    job = Job(
        id=new_job_id(),
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        state=JobState.QUEUED.value,
        params=params.render_fields(),
        seed=resolve_seed(params.seed),
        number_of_images=params.number_of_images,
        price_per_image=unit_price,
        created_at=now,
        deadline_at=now + deadline if deadline is not None else None,
        expires_at=now + retention if retention is not None else None,
    )
    session.add(job)
    session.flush()
    # The hold's conditional UPDATE locks the user's row, so this count sees every
    # concurrent submission of the same user that committed before it.
    hold_credits(session, principal.user_id, job.id, unit_price * params.number_of_images)
    live = session.execute(
        select(func.count())
        .select_from(Job)
        .where(Job.user_id == principal.user_id, Job.state.in_([s.value for s in LIVE_STATES]))
    ).scalar_one()
    if max_live_jobs is not None and live > max_live_jobs:
        raise TooManyJobs(
            f"You have {max_live_jobs} requests queued or running, the most allowed; "
            "retry when some have finished",
            retry_after_s=10,
        )
    return job


def get_job(session: Session, principal: Principal, job_id: str) -> Job:
    """A job of the caller's tenant; any other job is indistinguishable from a missing one."""
    job = session.execute(
        select(Job).where(Job.id == job_id, Job.tenant_id == principal.tenant_id)
    ).scalar_one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def claim_job(session: Session, job_id: str, worker: str, lease: timedelta) -> RenderSpec | None:
    """Take a QUEUED job for rendering (attempt + 1); None if it is not claimable."""
    now = utcnow()
    attempt = session.execute(
        update(Job)
        .where(
            Job.id == job_id, Job.state == JobState.QUEUED.value, Job.cancel_requested.is_(False)
        )
        .values(
            state=JobState.RUNNING.value,
            attempt=Job.attempt + 1,
            worker=worker,
            started_at=func.coalesce(Job.started_at, now),
            lease_expires_at=now + lease,
        )
        .returning(Job.attempt)
    ).scalar_one_or_none()
    if attempt is None:
        return None
    job = session.get_one(Job, job_id)
    delivered = session.execute(select(JobImage.index).where(JobImage.job_id == job_id)).scalars()
    return RenderSpec(
        job_id=job.id,
        tenant_id=job.tenant_id,
        attempt=attempt,
        params=KolorsParams.model_validate(job.params),
        seed=job.seed,
        delivered=frozenset(delivered),
        deadline_at=job.deadline_at,
    )


def record_image(
    session: Session,
    job_id: str,
    attempt: int,
    index: int,
    *,
    seed: int,
    storage_key: str,
    content_type: str,
    size_bytes: int,
    generation: dict[str, Any] | None = None,
) -> None:
    """Record one delivered image and capture its price; StaleAttempt if the claim was lost."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING.value)
        .values(images_done=Job.images_done + 1)
        .returning(Job.user_id, Job.price_per_image)
    ).first()
    if row is None:
        raise StaleAttempt(f"job {job_id} is no longer held by attempt {attempt}")
    session.add(
        JobImage(
            job_id=job_id,
            index=index,
            seed=seed,
            storage_key=storage_key,
            content_type=content_type,
            size_bytes=size_bytes,
            attempt=attempt,
            generation=generation,
        )
    )
    capture_image_credit(session, row.user_id, job_id, row.price_per_image)


def finish_job(
    session: Session, job_id: str, attempt: int, stopped_because: str | None = None
) -> JobState:
    """End a rendered job: COMPLETED, or CANCELLED if a cancel arrived; release the rest.

    `stopped_because` says why the worker stopped early (a deadline); the job ends
    CANCELLED with that error.
    """
    values: dict[str, Any] = {"finished_at": utcnow(), "lease_expires_at": None}
    if stopped_because is None:
        values["state"] = _FINISHED_STATE
    else:
        values.update(state=JobState.CANCELLED.value, cancel_requested=True, error=stopped_because)
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING.value)
        .values(**values)
        .returning(Job.user_id, Job.state)
    ).first()
    if row is None:
        raise StaleAttempt(f"job {job_id} is no longer held by attempt {attempt}")
    release_hold(session, row.user_id, job_id)
    return JobState(row.state)


def fail_job(session: Session, job_id: str, error: str, attempt: int | None = None) -> bool:
    """Mark a live job FAILED with `error` and release its hold; False if it was not live."""
    conditions = [Job.id == job_id, Job.state.in_([s.value for s in LIVE_STATES])]
    if attempt is not None:
        # A worker's failure counts only while its claim holds: a requeued job keeps its
        # attempt number until the next claim, so the state must be checked too.
        conditions += [Job.attempt == attempt, Job.state == JobState.RUNNING.value]
    user_id = session.execute(
        update(Job)
        .where(*conditions)
        .values(
            state=JobState.FAILED.value, error=error, finished_at=utcnow(), lease_expires_at=None
        )
        .returning(Job.user_id)
    ).scalar_one_or_none()
    if user_id is None:
        return False
    release_hold(session, user_id, job_id)
    return True


def cancel_job(session: Session, principal: Principal, job_id: str) -> Job:
    """Cancel a job: a queued one ends now, a running one stops at its next step."""
    job = get_job(session, principal, job_id)
    if job.state == JobState.QUEUED.value:
        ended = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED.value)
            .values(
                state=JobState.CANCELLED.value,
                cancel_requested=True,
                finished_at=utcnow(),
                error="Cancelled by the user",
            )
            .returning(Job.id)
        ).first()
        if ended is not None:
            release_hold(session, job.user_id, job_id)
    elif job.state == JobState.RUNNING.value:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
            .values(cancel_requested=True, error="Cancelled by the user")
        )
    session.refresh(job)
    return job


def public_status(job: Job) -> str:
    """Segmind's four states: QUEUED, PROCESSING, COMPLETED, FAILED."""
    return PUBLIC_STATUS[JobState(job.state)]


def job_state(session: Session, job_id: str) -> JobState:
    """A job's current state, read fresh."""
    return JobState(session.execute(select(Job.state).where(Job.id == job_id)).scalar_one())


def renew_lease(session: Session, job_id: str, attempt: int, lease: timedelta) -> bool:
    """Extend a running job's lease; False if `attempt` no longer holds it."""
    renewed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING.value)
        .values(lease_expires_at=utcnow() + lease)
        .returning(Job.id)
    ).scalar_one_or_none()
    return renewed is not None


def results_expired(job: Job, now: datetime | None = None) -> bool:
    """Whether the job's results are past their retention (served never again)."""
    if job.results_deleted_at is not None:
        return True
    return job.expires_at is not None and job.expires_at <= (now or utcnow())


def ensure_results_retained(job: Job) -> None:
    """ResultsExpired unless the job's results may still be served."""
    if results_expired(job):
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
                Job.expires_at <= utcnow(),
                Job.results_deleted_at.is_(None),
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


def mark_results_deleted(session: Session, job_id: str) -> None:
    """Record that a job's stored results are gone."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.results_deleted_at.is_(None))
        .values(results_deleted_at=utcnow())
    )
