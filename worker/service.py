"""One render job, end to end: claim, render, store, record, settle, announce.

The database is touched only in short transactions between renders, never
during one; every write carries the claimed attempt number.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import redis
import torch
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.errors import StaleAttempt
from shared.events import Progress, announce_job_finished, is_cancel_requested, write_progress
from shared.imaging import encode_image
from shared.jobs import RenderSpec, claim_job, fail_job, finish_job, image_storage_key, record_image
from shared.models import JobState
from shared.settings import Settings
from shared.storage import ResultStorage
from worker.pipeline import KolorsRenderer

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a worker process holds for its whole life."""

    name: str
    settings: Settings
    sessions: sessionmaker[Session]
    redis: redis.Redis
    storage: ResultStorage
    renderer: KolorsRenderer


class _ProgressReporter:
    """Writes step progress to Redis at most every `interval_s`, and checks for a cancel."""

    def __init__(self, context: WorkerContext, spec: RenderSpec) -> None:
        self._context = context
        self._spec = spec
        self._last = 0.0
        self.images_done = len(spec.delivered)

    def step(self, step: int, steps: int) -> None:
        now = time.monotonic()
        if step == steps or now - self._last >= self._context.settings.progress_interval_s:
            self._last = now
            self.write(step, steps)

    def write(self, step: int, steps: int) -> None:
        write_progress(
            self._context.redis,
            self._spec.job_id,
            Progress(
                attempt=self._spec.attempt,
                step=step,
                steps=steps,
                images_done=self.images_done,
                images=self._spec.params.number_of_images,
                updated_at=time.time(),
            ),
        )

    def should_stop(self) -> bool:
        return is_cancel_requested(self._context.redis, self._spec.job_id)


def run_render_job(context: WorkerContext, job_id: str) -> None:
    """Render a job if it can be claimed; a message for a job that is not QUEUED is a no-op."""
    lease = timedelta(seconds=context.settings.visibility_timeout_s)
    with transaction(context.sessions) as session:
        spec = claim_job(session, job_id, context.name, lease)
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
    try:
        _render_pending_images(context, spec)
        with transaction(context.sessions) as session:
            state = finish_job(session, job_id, spec.attempt).value
    except StaleAttempt:
        # Another attempt owns the job now (a lease expired); it settles, not us.
        log.warning("job %s: attempt %d lost its claim; dropping its work", job_id, spec.attempt)
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
        announce_job_finished(context.redis, job_id, state)
    log.info("job %s attempt %d: %s", job_id, spec.attempt, state)


def _fail(context: WorkerContext, spec: RenderSpec, error: str) -> None:
    with transaction(context.sessions) as session:
        fail_job(session, spec.job_id, error, attempt=spec.attempt)


def _render_pending_images(context: WorkerContext, spec: RenderSpec) -> None:
    params = spec.params
    reporter = _ProgressReporter(context, spec)
    pending = spec.pending_indices()
    batch = context.settings.render_batch_size
    reporter.write(0, params.steps)
    for start in range(0, len(pending), batch):
        indices = pending[start : start + batch]
        images = context.renderer.render(
            params, [spec.image_seed(i) for i in indices], reporter.step, reporter.should_stop
        )
        if images is None:
            log.info("job %s: cancelled mid-render", spec.job_id)
            return
        for index, image in zip(indices, images, strict=True):
            data, content_type = encode_image(image, params.output_format, params.output_quality)
            key = image_storage_key(spec.tenant_id, spec.job_id, index, params.output_format)
            # Stored before it is recorded: a recorded image always exists.
            context.storage.put(key, data, content_type)
            with transaction(context.sessions) as session:
                record_image(
                    session,
                    spec.job_id,
                    spec.attempt,
                    index,
                    seed=spec.image_seed(index),
                    storage_key=key,
                    content_type=content_type,
                    size_bytes=len(data),
                )
            reporter.images_done += 1
        if reporter.should_stop():
            return
