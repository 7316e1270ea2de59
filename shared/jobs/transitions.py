"""Every change of a job's state, with the user's line and the ledger entries that go with it.

The one module that writes jobs. Each change is a conditional UPDATE on the job
row; every write a worker makes carries the attempt number it claimed with (a
fencing token), so a redelivered or stale message can never deliver, charge or
settle twice. The user's line (`user_queues`) and the ledger change in the same
transaction as the job, so they are right after any crash.

A job's life: submitted (QUEUED, waiting in its user's line) -> released by the
dispatcher (QUEUED, in flight) -> claimed by a worker (RUNNING) -> ended
(COMPLETED, FAILED or CANCELLED, its unspent hold released). A released job can
go back in line (its message was lost); a RUNNING one too (its lease lapsed).

The lines and tenants' queues are kept by `shared.scheduling.lines`, whose lock order every
transition here follows (see `keeps_tenants`), and only by it. What must happen
once a change commits (announcing an end, counting it, waking the dispatcher) is
recorded here with `shared.jobs.effects.after_commit` and published after the
commit for every caller.
"""

from __future__ import annotations

import secrets
import time
import typing
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from sqlalchemy import Table, bindparam, case, func, insert, select, update
from sqlalchemy.orm import Session

from shared.accounts.ledger import capture_image_credit, hold_credits, release_hold
from shared.accounts.pricing import price_per_image
from shared.accounts.users import Principal
from shared.clock import database_now
from shared.errors import StaleAttempt, TooManyJobs
from shared.jobs.cache import CacheHit, cached_price
from shared.jobs.effects import (
    CancelRequested,
    ImageDelivered,
    JobEnded,
    JobRequeued,
    JobStarted,
    JobSubmitted,
    after_commit,
)
from shared.jobs.events import StepProgress
from shared.jobs.params import EXTENSIONS, MAX_SEED, RANDOM_SEED, KolorsParams, image_seed
from shared.jobs.queries import claims_of, expired_leases, get_job, past_deadline
from shared.models import (
    RELEASED,
    RUNNING,
    WAITING,
    Job,
    JobImage,
    JobState,
)
from shared.scheduling.fairshare import QueuedJob
from shared.scheduling.lines import (
    Line,
    join_line,
    keeps_tenants,
    leave_for_good,
    lock_line,
    lock_line_of_job,
    lock_lines,
    next_submission_time,
    note_submission,
    release_from_line,
    return_to_line,
    save_line,
)
from shared.scheduling.order import next_in_fair_order
from shared.webhooks.outbox import COMPLETED, START, add_delivery

DEADLINE_ERROR: Final = "The request's deadline passed; undelivered images were not charged"
CANCELLED_ERROR: Final = "Cancelled by the user"
_LIVE: Final = (JobState.QUEUED.value, JobState.RUNNING.value)


# The statements every job runs, built once as Core statements with bound parameters
# (building an ORM statement per call cost more CPU than running it).
_JOBS: Final = typing.cast(Table, Job.__table__)
_jobs = _JOBS.c
# A rendered job whose cancel arrived mid-render ends CANCELLED, keeping what it delivered.
_FINISHED_STATE: Final = case(
    (_jobs.cancel_requested.is_(True), JobState.CANCELLED.value), else_=JobState.COMPLETED.value
)
_INSERT_IMAGE: Final = insert(typing.cast(Table, JobImage.__table__))
_RELEASE: Final = (
    update(_JOBS)
    .where(
        _jobs.id.in_(bindparam("release_ids", expanding=True)),
        WAITING,
        _jobs.cancel_requested.is_(False),
    )
    .values(released_at=bindparam("release_at", type_=_jobs.released_at.type))
    .returning(_jobs.id, _jobs.user_id, _jobs.queue_seq, _jobs.work)
)
_CLAIM: Final = (
    update(_JOBS)
    .where(_jobs.id == bindparam("claim_job_id"), RELEASED, _jobs.cancel_requested.is_(False))
    .values(
        state=JobState.RUNNING.value,
        attempt=_jobs.attempt + 1,
        worker=bindparam("claim_worker", type_=_jobs.worker.type),
        started_at=func.coalesce(
            _jobs.started_at, bindparam("claim_now", type_=_jobs.started_at.type)
        ),
        lease_expires_at=bindparam("claim_lease_until", type_=_jobs.lease_expires_at.type),
    )
    .returning(
        _jobs.attempt,
        _jobs.user_id,
        _jobs.tenant_id,
        _jobs.params,
        _jobs.seed,
        _jobs.deadline_at,
        _jobs.webhook_url,
        _jobs.webhook_events,
        _jobs.created_at,
        _jobs.started_at,
    )
)
_COUNT_IMAGE: Final = (
    update(_JOBS)
    .where(
        _jobs.id == bindparam("image_job_id"),
        _jobs.attempt == bindparam("image_attempt"),
        _jobs.state == JobState.RUNNING.value,
    )
    .values(images_done=_jobs.images_done + 1)
    .returning(
        _jobs.user_id,
        _jobs.tenant_id,
        _jobs.price_per_image,
        _jobs.number_of_images,
        _jobs.images_done,
    )
)


@dataclass(frozen=True)
class RenderSpec:
    """What a worker needs to render a claimed job; a snapshot, free of any session."""

    job_id: str
    user_id: int
    tenant_id: int
    attempt: int
    params: KolorsParams
    seed: int
    delivered: frozenset[int]
    deadline_at: datetime | None = None
    # The database's time at the claim: with `deadline_at`, the time the render has left,
    # which the worker counts on its own monotonic clock, whatever its wall clock says.
    claimed_at: datetime | None = None

    def image_seed(self, index: int) -> int:
        """The seed of image `index` of this job."""
        return image_seed(self.seed, index)

    def pending_indices(self) -> list[int]:
        """Image indices not yet delivered by an earlier attempt."""
        return [i for i in range(self.params.number_of_images) if i not in self.delivered]

    def time_to_deadline(self) -> timedelta | None:
        """How long the job had left before its deadline when it was claimed; None: no deadline."""
        if self.deadline_at is None or self.claimed_at is None:
            return None
        return self.deadline_at - self.claimed_at


def new_job_id() -> str:
    """A new, unguessable job id."""
    return uuid.uuid4().hex


def resolve_seed(requested: int) -> int:
    """The base seed a job will use: the requested one, or a random one for -1."""
    return secrets.randbelow(MAX_SEED + 1) if requested == RANDOM_SEED else requested


def image_storage_key(tenant_id: int, job_id: str, index: int, output_format: str) -> str:
    """Deterministic object key of a job's image, so a redelivered upload overwrites."""
    return f"{tenant_id}/{job_id}/{index}.{EXTENSIONS[output_format]}"


def _still_held(row: Any) -> int:
    """What a rendered job still holds: its price for each image not yet delivered.

    Its hold was the price of every image and each delivered image captured one
    price, in the transaction that counted it (the audit checks both).
    """
    return int(row.price_per_image * (row.number_of_images - row.images_done))


def pixel_steps(params: KolorsParams) -> int:
    """A request's size: width x height x steps x images."""
    return params.width * params.height * params.steps * params.number_of_images


def _end_job(
    session: Session, line: Line, job_id: str, conditions: list[Any], values: dict[str, Any]
) -> str | None:
    """End a live job (the only place that does): its line, then its hold released.

    Returns the state it ended in, or None if `conditions` no longer hold.
    """
    row = session.execute(
        update(_JOBS)
        .where(_jobs.id == job_id, _jobs.state.in_(_LIVE), *conditions)
        .values(finished_at=database_now(session), lease_expires_at=None, **values)
        .returning(
            _jobs.released_at,
            _jobs.queue_seq,
            _jobs.work,
            _jobs.state,
            _jobs.tenant_id,
            _jobs.webhook_url,
            _jobs.webhook_events,
            _jobs.price_per_image,
            _jobs.number_of_images,
            _jobs.images_done,
        )
    ).first()
    if row is None:
        return None
    # The outbox row commits with the end itself: no crash can lose the event.
    add_delivery(session, job_id, row.tenant_id, row.webhook_url, row.webhook_events, COMPLETED)
    released = row.released_at is not None
    leave_for_good(session, line, job_id, row.queue_seq, row.work, released)
    save_line(session, line)
    release_hold(session, line.user_id, job_id, held=_still_held(row))
    state: str = row.state
    after_commit(session, JobEnded(job_id, row.tenant_id, state, freed_slot=released))
    return state


# ---------------------------------------------------------------- submit and release


@keeps_tenants
def submit_job(
    session: Session,
    principal: Principal,
    params: KolorsParams,
    reference_price: Decimal,
    *,
    max_live_jobs: int | None = None,
    deadline: timedelta | None = None,
    retention: timedelta | None = None,
    cached: CacheHit | None = None,
) -> Job:
    """Record a QUEUED job at the end of its user's line and hold its full price.

    With `cached` (its images already copied from the result cache), the job is
    COMPLETED at once instead, charged the cache's fraction of the price.
    NotEnoughCredits or TooManyJobs roll the caller's transaction back, so a
    refused request leaves nothing behind.
    """
    line = lock_line(session, principal.user_id)
    if cached is not None:
        return _complete_from_cache(
            session, line, principal, params, cached, reference_price, retention
        )
    if max_live_jobs is not None and line.waiting + line.in_flight >= max_live_jobs:
        raise TooManyJobs(
            f"You have {max_live_jobs} requests queued or running, the most allowed; "
            "retry when some have finished",
            retry_after_s=10,
        )
    unit_price = price_per_image(params.width, params.height, params.steps, reference_price)
    now = database_now(session)
    created_at = next_submission_time(line, now)
    job = _new_job(
        principal,
        params,
        job_id=new_job_id(),
        state=JobState.QUEUED,
        seed=resolve_seed(params.seed),
        price_per_image=unit_price,
        created_at=created_at,
        expires_at=now + retention if retention is not None else None,
        deadline_at=now + deadline if deadline is not None else None,
        queue_seq=join_line(line, created_at, pixel_steps(params)),
    )
    session.add(job)
    session.flush()
    hold_credits(session, principal.user_id, job.id, unit_price * params.number_of_images)
    save_line(session, line)
    after_commit(session, JobSubmitted(job.tenant_id))
    return job


def _new_job(
    principal: Principal,
    params: KolorsParams,
    *,
    job_id: str,
    state: JobState,
    seed: int,
    price_per_image: int,
    created_at: datetime,
    expires_at: datetime | None,
    **columns: Any,
) -> Job:
    """A new job row of `principal`'s for `params`: the columns every submission sets."""
    return Job(
        id=job_id,
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        state=state.value,
        params=params.render_fields(),
        seed=seed,
        number_of_images=params.number_of_images,
        price_per_image=price_per_image,
        created_at=created_at,
        expires_at=expires_at,
        work=pixel_steps(params),
        **webhook_fields(params),
        **columns,
    )


def _complete_from_cache(
    session: Session,
    line: Line,
    principal: Principal,
    params: KolorsParams,
    cached: CacheHit,
    reference_price: Decimal,
    retention: timedelta | None,
) -> Job:
    """Record a job answered from the result cache: COMPLETED, its copies recorded as cached.

    It never enters the line; its price (the cache's fraction) is held and captured
    image by image as a rendered job's is, so the ledger reads the same; a free hit
    writes no ledger entry.
    """
    full_price = price_per_image(params.width, params.height, params.steps, reference_price)
    unit_price = cached_price(full_price, cached.price_fraction)
    now = database_now(session)
    created_at = next_submission_time(line, now)
    job = _new_job(
        principal,
        params,
        job_id=cached.job_id,
        state=JobState.COMPLETED,
        seed=params.seed,
        price_per_image=unit_price,
        created_at=created_at,
        expires_at=now + retention if retention is not None else None,
        images_done=params.number_of_images,
        started_at=created_at,
        finished_at=created_at,
    )
    session.add(job)
    session.flush()
    # It starts and ends here: each event the request asked for, in order.
    for event in (START, COMPLETED):
        add_delivery(session, job.id, job.tenant_id, job.webhook_url, job.webhook_events, event)
    if unit_price > 0:
        hold_credits(session, principal.user_id, job.id, unit_price * params.number_of_images)
    for index, (image, key) in enumerate(zip(cached.images, cached.storage_keys, strict=True)):
        session.add(
            JobImage(
                job_id=job.id,
                index=index,
                seed=image.seed,
                storage_key=key,
                content_type=image.content_type,
                size_bytes=image.size_bytes,
                attempt=0,
                generation=image.generation,
                cached=True,
            )
        )
        if unit_price > 0:
            capture_image_credit(session, principal.user_id, job.id, unit_price)
    note_submission(line, created_at)
    save_line(session, line)
    delivered = ImageDelivered(job.tenant_id, unit_price, cached=True)
    ended = JobEnded(job.id, job.tenant_id, job.state, freed_slot=False)
    after_commit(
        session,
        JobSubmitted(job.tenant_id, queued=False),
        *[delivered] * job.number_of_images,
        ended,
    )
    return job


@keeps_tenants
def release_jobs(session: Session, jobs: list[QueuedJob]) -> list[str]:
    """Mark jobs released (in flight), in the order given; return those still waiting.

    A bounded number of statements for the whole batch: one locking every line, one
    releasing every job, then one per line and two per tenant.
    """
    if not jobs:
        return []
    lines = lock_lines(session, {job.user_id for job in jobs})
    rows = session.execute(
        _RELEASE,
        {"release_ids": [job.job_id for job in jobs], "release_at": database_now(session)},
    ).all()
    by_user: dict[int, list[Any]] = {}
    for row in rows:
        by_user.setdefault(row.user_id, []).append(row)
    for user_id in sorted(by_user):
        line = lines[user_id]
        # The numbers are as they were before any of these left: taken in line order,
        # each one whose gap closed from behind moved the later ones forward by one.
        moved_forward = 0
        for row in sorted(by_user[user_id], key=lambda row: row.queue_seq):
            seq = row.queue_seq - moved_forward
            if release_from_line(session, line, row.id, seq, row.work):
                moved_forward += 1
        save_line(session, line)
    released = {row.id for row in rows}
    return [job.job_id for job in jobs if job.job_id in released]


@keeps_tenants
def unrelease_job(session: Session, job_id: str) -> None:
    """Put a released job back in line (its message could not be published)."""
    line = lock_line_of_job(session, job_id)
    if line is None:
        return
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, RELEASED)
        .values(released_at=None)
        .returning(Job.created_at, Job.work)
    ).first()
    if row is None:
        return
    return_to_line(session, line, job_id, row.created_at, row.work)
    save_line(session, line)


def touch_release(session: Session, job_id: str) -> None:
    """Restart a released job's clock after its message was published again."""
    now = database_now(session)
    session.execute(update(Job).where(Job.id == job_id, RELEASED).values(released_at=now))


# ---------------------------------------------------------------- the worker's writes


def claim_job(session: Session, job_id: str, worker: str, lease: timedelta) -> RenderSpec | None:
    """Take a released job for rendering (attempt + 1); None if it is not claimable.

    A job that is still waiting its turn is not claimable: the dispatcher, not a
    stray message, decides what starts.
    """
    now = database_now(session)
    claim = {
        "claim_job_id": job_id,
        "claim_worker": worker,
        "claim_now": now,
        "claim_lease_until": now + lease,
    }
    row = session.execute(_CLAIM, claim).first()
    if row is None:
        return None
    queue_wait_s = None
    if row.attempt == 1:  # the first claim starts the job; a retry is not a new start
        add_delivery(session, job_id, row.tenant_id, row.webhook_url, row.webhook_events, START)
        queue_wait_s = max(0.0, (row.started_at - row.created_at).total_seconds())
    delivered: frozenset[int] = frozenset()
    if row.attempt > 1:  # only an earlier attempt can have delivered images
        delivered = frozenset(
            session.execute(select(JobImage.index).where(JobImage.job_id == job_id)).scalars()
        )
    spec = RenderSpec(
        job_id=job_id,
        user_id=row.user_id,
        tenant_id=row.tenant_id,
        attempt=row.attempt,
        params=KolorsParams.model_validate(row.params),
        seed=row.seed,
        delivered=delivered,
        deadline_at=row.deadline_at,
        claimed_at=now,
    )
    progress = StepProgress(
        attempt=spec.attempt,
        step=0,
        steps=spec.params.steps,
        images_done=len(delivered),
        images=spec.params.number_of_images,
        updated_at=time.time(),  # shown to the job's watchers only; decides nothing
    )
    after_commit(session, JobStarted(job_id, row.tenant_id, progress, queue_wait_s))
    return spec


def renew_lease(session: Session, job_id: str, attempt: int, lease: timedelta) -> bool:
    """Extend a running job's lease; False if `attempt` no longer holds it."""
    renewed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING.value)
        .values(lease_expires_at=database_now(session) + lease)
        .returning(Job.id)
    ).scalar_one_or_none()
    return renewed is not None


@keeps_tenants
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
    finish: bool = False,
    stopped_because: str | None = None,
    cache_key: str | None = None,
    user_id: int | None = None,
) -> JobState | None:
    """Record one stored image and capture its price; StaleAttempt if the claim was lost.

    `cache_key` (shared.jobs.cache) lets an identical request be answered with this image.
    `user_id`, the job's owner when the caller knows it, saves looking it up.

    With `finish`, the job also ends in the same transaction (its last image): one
    commit instead of two. Returns the state it ended in, else None.
    """
    # Ending locks the user's line, which must come before the job row (see the module).
    line = None
    if finish:
        line = lock_line_of_job(session, job_id) if user_id is None else lock_line(session, user_id)
    row = session.execute(_COUNT_IMAGE, {"image_job_id": job_id, "image_attempt": attempt}).first()
    if row is None:
        raise StaleAttempt(f"job {job_id} is no longer held by attempt {attempt}")
    if line is not None and line.user_id != row.user_id:
        raise ValueError(f"job {job_id} is user {row.user_id}'s, not user {line.user_id}'s")
    image = {
        "job_id": job_id,
        "index": index,
        "seed": seed,
        "storage_key": storage_key,
        "content_type": content_type,
        "size_bytes": size_bytes,
        "attempt": attempt,
        "generation": generation,
        "cache_key": cache_key,
        "cached": False,
    }
    session.execute(_INSERT_IMAGE, image)
    # `images_done` already counts this image: the hold covered one more before it.
    held = _still_held(row) + row.price_per_image
    capture_image_credit(session, row.user_id, job_id, row.price_per_image, held=held)
    after_commit(session, ImageDelivered(row.tenant_id, row.price_per_image))
    if line is None:
        return None
    return _finish(session, line, job_id, attempt, stopped_because)


def _finish(
    session: Session, line: Line, job_id: str, attempt: int, stopped_because: str | None
) -> JobState:
    values: dict[str, Any] = {"state": _FINISHED_STATE}
    if stopped_because is not None:
        values = {
            "state": JobState.CANCELLED.value,
            "cancel_requested": True,
            "error": stopped_because,
        }
    conditions = [_jobs.attempt == attempt, _jobs.state == JobState.RUNNING.value]
    state = _end_job(session, line, job_id, conditions, values)
    if state is None:
        raise StaleAttempt(f"job {job_id} is no longer held by attempt {attempt}")
    return JobState(state)


@keeps_tenants
def finish_job(
    session: Session, job_id: str, attempt: int, stopped_because: str | None = None
) -> JobState:
    """End a rendered job: COMPLETED, or CANCELLED if a cancel arrived; release the rest.

    `stopped_because` says why the worker stopped early (a deadline); the job ends
    CANCELLED with that error.
    """
    line = lock_line_of_job(session, job_id)
    if line is None:
        raise StaleAttempt(f"job {job_id} does not exist")
    return _finish(session, line, job_id, attempt, stopped_because)


@keeps_tenants
def fail_job(session: Session, job_id: str, error: str, attempt: int | None = None) -> bool:
    """Mark a live job FAILED with `error` and release its hold; False if it was not live."""
    conditions: list[Any] = []
    if attempt is not None:
        # A worker's failure counts only while its claim holds: a requeued job keeps its
        # attempt number until the next claim, so the state must be checked too.
        conditions = [Job.attempt == attempt, Job.state == JobState.RUNNING.value]
    line = lock_line_of_job(session, job_id)
    if line is None:
        return False
    values = {"state": JobState.FAILED.value, "error": error}
    return _end_job(session, line, job_id, conditions, values) is not None


# ---------------------------------------------------------------- the user's and the dispatcher's


@keeps_tenants
def cancel_job(session: Session, principal: Principal, job_id: str) -> Job:
    """Cancel a job: a queued one ends now, a running one stops at its next step."""
    job = get_job(session, principal, job_id)
    if job.state == JobState.QUEUED.value:
        line = lock_line(session, job.user_id)
        _end_job(
            session,
            line,
            job_id,
            [Job.state == JobState.QUEUED.value],
            {
                "state": JobState.CANCELLED.value,
                "cancel_requested": True,
                "error": CANCELLED_ERROR,
            },
        )
    elif job.state == JobState.RUNNING.value:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
            .values(cancel_requested=True, error=CANCELLED_ERROR)
        )
        after_commit(session, CancelRequested(job_id))
    session.refresh(job)
    return job


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


@keeps_tenants
def recover_expired_leases(
    session: Session, max_attempts: int, limit: int = 500
) -> list[LeaseOutcome]:
    """Settle RUNNING jobs whose lease expired: requeue, fail or cancel them.

    A job is failed once it has used `max_attempts`, and ends CANCELLED when a cancel
    (or its deadline) arrived before its worker died.
    """
    now = database_now(session)
    lapsed = Job.lease_expires_at < now
    return _recover_claims(session, expired_leases(session, now, limit), lapsed, max_attempts)


@keeps_tenants
def reclaim_claims_of(
    session: Session, workers: Collection[str], max_attempts: int, limit: int = 500
) -> list[LeaseOutcome]:
    """Settle the RUNNING jobs of workers known to be gone, without waiting for their leases.

    For a worker that restarted under the same name (its previous life's claims) or
    whose heartbeat lapsed. The attempt fence keeps it safe if one was only slow or
    cut off: its late writes are refused.
    """
    if not workers:
        return []
    held = claims_of(session, sorted(workers), limit)
    return _recover_claims(session, held, Job.worker.in_(sorted(workers)), max_attempts)


def _recover_claims(
    session: Session, job_ids: list[str], still_lost: Any, max_attempts: int
) -> list[LeaseOutcome]:
    """Requeue, fail or cancel RUNNING jobs whose claims were lost (`still_lost` holds)."""
    outcomes: list[LeaseOutcome] = []
    for job_id in job_ids:
        line = lock_line_of_job(session, job_id)
        row = session.execute(
            select(Job.attempt, Job.cancel_requested).where(
                Job.id == job_id, Job.state == JobState.RUNNING.value, still_lost
            )
        ).first()
        if line is None or row is None:
            continue
        conditions = [Job.attempt == row.attempt, Job.state == JobState.RUNNING.value, still_lost]
        if row.cancel_requested:
            values = {"state": JobState.CANCELLED.value}
            if _end_job(session, line, job_id, conditions, values):
                outcomes.append(LeaseOutcome(job_id, row.attempt, JobState.CANCELLED))
            continue
        if row.attempt >= max_attempts:
            error = (
                f"The render was lost {row.attempt} times (its worker stopped); "
                "the credits for undelivered images were released"
            )
            values = {"state": JobState.FAILED.value, "error": error}
            if _end_job(session, line, job_id, conditions, values):
                outcomes.append(LeaseOutcome(job_id, row.attempt, JobState.FAILED))
            continue
        requeued = session.execute(
            update(Job)
            .where(Job.id == job_id, *conditions, Job.cancel_requested.is_(False))
            .values(
                state=JobState.QUEUED.value,
                worker=None,
                lease_expires_at=None,
                released_at=None,
            )
            .returning(Job.created_at, Job.work)
        ).first()
        if requeued is not None:
            return_to_line(session, line, job_id, requeued.created_at, requeued.work)
            save_line(session, line)
            after_commit(session, JobRequeued(job_id))
            outcomes.append(LeaseOutcome(job_id, row.attempt, JobState.QUEUED))
    return outcomes


@dataclass(frozen=True)
class DeadlineOutcome:
    """Jobs whose deadline passed: queued ones were cancelled, running ones must stop."""

    cancelled: list[str]
    running: list[str]


@keeps_tenants
def enforce_deadlines(session: Session, limit: int = 500) -> DeadlineOutcome:
    """Cancel queued jobs past their deadline; flag running ones to stop."""
    now = database_now(session)
    cancelled = []
    for job_id in past_deadline(session, now, limit):
        line = lock_line_of_job(session, job_id)
        if line is None:
            continue
        ended = _end_job(
            session,
            line,
            job_id,
            [Job.state == JobState.QUEUED.value, Job.deadline_at < now],
            {
                "state": JobState.CANCELLED.value,
                "cancel_requested": True,
                "error": DEADLINE_ERROR,
            },
        )
        if ended is not None:
            cancelled.append(job_id)
    running = session.execute(
        update(Job)
        .where(RUNNING, Job.deadline_at < now, Job.cancel_requested.is_(False))
        .values(cancel_requested=True, error=DEADLINE_ERROR)
        .returning(Job.id)
    ).scalars()
    stopping = list(running)
    after_commit(session, *[CancelRequested(job_id) for job_id in stopping])
    return DeadlineOutcome(cancelled=cancelled, running=stopping)


def mark_results_deleted(session: Session, job_id: str) -> None:
    """Record that a job's stored results are gone (and no longer answer the result cache)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.results_deleted_at.is_(None))
        .values(results_deleted_at=database_now(session))
    )
    # The cache index then holds retained images only, so a lookup never wades through
    # the keys of images long deleted.
    session.execute(
        update(JobImage)
        .where(JobImage.job_id == job_id, JobImage.cache_key.is_not(None))
        .values(cache_key=None)
    )


def release_next_jobs(session: Session, slots: int, max_running_per_user: int) -> list[str]:
    """Release up to `slots` waiting jobs in fair-share order; return their ids."""
    return release_jobs(session, next_in_fair_order(session, slots, max_running_per_user))


def webhook_fields(params: KolorsParams) -> dict[str, str | None]:
    """A new job's `webhook_url` and `webhook_events` columns, from its request."""
    if params.webhook is None:
        return {"webhook_url": None, "webhook_events": None}
    return {
        "webhook_url": params.webhook,
        "webhook_events": ",".join(params.webhook_events_filter),
    }
