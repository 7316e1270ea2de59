"""One render job, end to end: claim, render, store, record, settle, announce.

The database is touched only in short transactions between renders, never
during one; every write carries the claimed attempt number.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TypeVar

import redis
import torch
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.errors import StaleAttempt
from shared.events import (
    Progress,
    announce_job_finished,
    is_cancel_requested,
    record_render_speed,
    wake_dispatcher,
    write_progress,
)
from shared.imaging import encode_image
from shared.models import JobState, utcnow
from shared.queries import work_units
from shared.settings import Settings
from shared.storage import ResultStorage
from shared.transitions import (
    DEADLINE_ERROR,
    RenderSpec,
    claim_job,
    fail_job,
    finish_job,
    image_storage_key,
    record_image,
    renew_lease,
)
from worker.memory import MIB, MemoryModel, plan_chunks
from worker.pipeline import KolorsRenderer

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class WorkerContext:
    """What a worker process holds for its whole life."""

    name: str
    settings: Settings
    sessions: sessionmaker[Session]
    redis: redis.Redis
    storage: ResultStorage
    renderer: KolorsRenderer
    current_job: str | None = None


class _ProgressReporter:
    """Writes step progress to Redis at most every `interval_s`, and checks for a cancel."""

    def __init__(self, context: WorkerContext, spec: RenderSpec, lease: _LeaseKeeper) -> None:
        self._context = context
        self._spec = spec
        self._lease = lease
        self._last = 0.0
        self.images_done = len(spec.delivered)
        self.deadline_passed = False

    def step(self, step: int, steps: int) -> None:
        now = time.monotonic()
        if step == steps or now - self._last >= self._context.settings.progress_interval_s:
            self._last = now
            self.write(step, steps)

    def write(self, step: int, steps: int) -> None:
        progress = Progress(
            attempt=self._spec.attempt,
            step=step,
            steps=steps,
            images_done=self.images_done,
            images=self._spec.params.number_of_images,
            updated_at=time.time(),
        )
        try:
            write_progress(self._context.redis, self._spec.job_id, progress)
        except redis.RedisError as exc:
            # Progress is a courtesy; a Redis outage must not fail the render.
            log.warning("job %s: progress not written (%s)", self._spec.job_id, type(exc).__name__)

    def should_stop(self) -> bool:
        """Stop at this step if the user cancelled, the deadline passed or the claim was lost."""
        if self._lease.lost.is_set():
            return True
        deadline = self._spec.deadline_at
        if deadline is not None and utcnow() >= deadline:
            self.deadline_passed = True
            return True
        try:
            return is_cancel_requested(self._context.redis, self._spec.job_id)
        except redis.RedisError:
            return False


class _LeaseKeeper:
    """Renews the claim's lease every third of its length while the job renders."""

    def __init__(self, context: WorkerContext, spec: RenderSpec) -> None:
        self._context = context
        self._spec = spec
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        lease_s = self._context.settings.lease_s
        while not self._stop.wait(lease_s / 3):
            try:
                with transaction(self._context.sessions) as session:
                    held = renew_lease(
                        session, self._spec.job_id, self._spec.attempt, timedelta(seconds=lease_s)
                    )
            except (OperationalError, InterfaceError) as exc:
                # The database is away; keep rendering and try again. If it stays away
                # past the lease, recovery requeues the job and our writes are refused.
                log.warning("job %s: lease not renewed (%s)", self._spec.job_id, type(exc).__name__)
                continue
            if not held:
                log.warning(
                    "job %s: attempt %d no longer holds the job; stopping",
                    self._spec.job_id,
                    self._spec.attempt,
                )
                self.lost.set()
                return


def _with_db_retry(context: WorkerContext, write: Callable[[Session], T]) -> T:
    """Run a short write transaction, retrying while the database is unreachable.

    Retrying is safe: every write is fenced by the attempt, so a write that lands
    after recovery requeued the job is refused, not applied twice.
    """
    give_up_at = time.monotonic() + context.settings.db_retry_s
    while True:
        try:
            with transaction(context.sessions) as session:
                return write(session)
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() >= give_up_at:
                raise
            log.warning("database unavailable (%s); retrying", type(exc).__name__)
            time.sleep(1.0)


def run_render_job(context: WorkerContext, job_id: str) -> None:
    """Render a job if it can be claimed; a message for a job that is not QUEUED is a no-op."""
    lease = timedelta(seconds=context.settings.lease_s)
    spec = _with_db_retry(context, lambda session: claim_job(session, job_id, context.name, lease))
    if spec is None:
        log.info("job %s is not claimable (already taken, finished or cancelled); skipping", job_id)
        return
    log.info(
        "job %s attempt %d: rendering %d image(s)",
        job_id,
        spec.attempt,
        len(spec.pending_indices()),
    )
    state: str = JobState.FAILED.value
    context.current_job = job_id
    try:
        with _LeaseKeeper(context, spec) as lease_keeper:
            reporter = _ProgressReporter(context, spec, lease_keeper)
            _render_pending_images(context, spec, reporter)
        if lease_keeper.lost.is_set():
            raise StaleAttempt(f"job {job_id}: attempt {spec.attempt} lost its lease")
        reason = DEADLINE_ERROR if reporter.deadline_passed else None
        state = _with_db_retry(
            context, lambda session: finish_job(session, job_id, spec.attempt, reason)
        ).value
    except StaleAttempt:
        # Another attempt owns the job now (a lease expired); it settles, not us.
        log.warning("job %s: attempt %d lost its claim; dropping its work", job_id, spec.attempt)
        return
    except (OperationalError, InterfaceError):
        # Not the render's fault: leave the job RUNNING; its lease expires and recovery
        # requeues it once the database is back.
        log.exception("job %s: database unreachable; leaving the job to recovery", job_id)
        return
    except torch.OutOfMemoryError:
        log.error("job %s: out of device memory", job_id)
        _fail(
            context,
            spec,
            "Out of GPU memory for this size and number of images; the credits were released",
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        log.exception("job %s: render failed", job_id)
        _fail(context, spec, "The render failed on the worker; the credits were released")
    finally:
        context.current_job = None
    # Only a settled job is announced: a waiter woken early would report a false failure.
    _announce_settled(context, job_id, state)
    log.info("job %s attempt %d: %s", job_id, spec.attempt, state)


def _announce_settled(context: WorkerContext, job_id: str, state: str) -> None:
    """Wake the job's waiters, and the dispatcher: this worker has a free slot now."""
    try:
        announce_job_finished(context.redis, job_id, state)
        wake_dispatcher(context.redis)
    except redis.RedisError as exc:
        # Waiters fall back to reading the job row; nothing is lost.
        log.warning("job %s: end not announced (%s)", job_id, type(exc).__name__)


def _fail(context: WorkerContext, spec: RenderSpec, error: str) -> None:
    _with_db_retry(
        context, lambda session: fail_job(session, spec.job_id, error, attempt=spec.attempt)
    )


def _record_speed(context: WorkerContext, spec: RenderSpec, images: int, seconds: float) -> None:
    params = spec.params
    work = work_units(params.width * params.height * params.steps * images)
    with contextlib.suppress(redis.RedisError):  # only the ETA would be less informed
        record_render_speed(context.redis, context.name, seconds / work)


def _render_pending_images(
    context: WorkerContext, spec: RenderSpec, reporter: _ProgressReporter
) -> None:
    params = spec.params
    settings = context.settings
    memory = MemoryModel(
        bytes_per_megapixel=settings.memory_per_megapixel_mb * MIB,
        reserve_bytes=settings.memory_reserve_mb * MIB,
    )
    per_call = context.renderer.images_per_call(params, settings.render_batch_size, memory)
    reporter.write(0, params.steps)
    for indices in plan_chunks(spec.pending_indices(), per_call):
        started = time.monotonic()
        images = context.renderer.render(
            params, [spec.image_seed(i) for i in indices], reporter.step, reporter.should_stop
        )
        if images is None:
            log.info("job %s: stopped mid-render", spec.job_id)
            return
        _record_speed(context, spec, len(indices), time.monotonic() - started)
        for index, image in zip(indices, images, strict=True):
            record = context.renderer.generation_record(params, spec.image_seed(index))
            data, content_type = encode_image(
                image, params.output_format, params.output_quality, record
            )
            key = image_storage_key(spec.tenant_id, spec.job_id, index, params.output_format)
            # Stored before it is recorded: a recorded image always exists.
            context.storage.put(key, data, content_type)
            _with_db_retry(
                context,
                partial(
                    record_image,
                    job_id=spec.job_id,
                    attempt=spec.attempt,
                    index=index,
                    seed=spec.image_seed(index),
                    storage_key=key,
                    content_type=content_type,
                    size_bytes=len(data),
                    generation=record,
                ),
            )
            reporter.images_done += 1
        if reporter.should_stop():
            return
