"""The progress reporter: an attempt's step progress in Redis, and its checks for a stop."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import redis

from shared.jobs.events import StepProgress, is_cancel_requested, publish_progress
from shared.jobs.transitions import RenderSpec

if TYPE_CHECKING:
    from worker.context import WorkerContext
    from worker.run import JobRun

log = logging.getLogger(__name__)


class ProgressReporter:
    """Writes step progress to Redis at most every `interval_s`, and checks for a cancel.

    The render thread reports steps and the post-processing thread recorded images; one
    of them writes at a time and the other never waits for it: the writer writes again
    with the newest values if they changed meanwhile, so the last write is always current.
    """

    def __init__(self, context: WorkerContext, spec: RenderSpec, run: JobRun) -> None:
        self._context = context
        self._spec = spec
        self._run = run
        self._last = 0.0
        self._state = threading.Lock()  # guards the values; never held during a write
        self._writing = False
        self._dirty = False
        self._step = 0
        self._steps = spec.params.steps
        self.images_done = len(spec.delivered)  # images recorded, as the status route says
        self.deadline_passed = False
        # The deadline on this process's monotonic clock: the time the job had left at its
        # claim (both read on the database's clock), counted from now, moments after the
        # claim. A host whose wall clock is wrong, or is stepped mid-render, stops neither
        # early nor late; the claim's commit only makes it a few milliseconds late.
        left = spec.time_to_deadline()
        self._deadline = None if left is None else time.monotonic() + left.total_seconds()

    def step(self, step: int, steps: int) -> None:
        """The render reached `step` of `steps`; written when due."""
        now = time.monotonic()
        with self._state:
            self._step, self._steps = step, steps
        if step == steps or now - self._last >= self._context.settings.progress_interval_s:
            self._last = now
            self._publish()

    def write(self, step: int, steps: int) -> None:
        """Write the progress now."""
        with self._state:
            self._step, self._steps = step, steps
        self._publish()

    def image_recorded(self) -> None:
        """One more image is recorded (post-processing thread)."""
        with self._state:
            self.images_done += 1
        self._publish()

    def _publish(self) -> None:
        with self._state:
            if self._writing:
                self._dirty = True  # the thread writing now writes these values too
                return
            self._writing = True
        while True:
            with self._state:
                self._dirty = False
                progress = StepProgress(
                    attempt=self._spec.attempt,
                    step=self._step,
                    steps=self._steps,
                    images_done=self.images_done,
                    images=self._spec.params.number_of_images,
                    updated_at=time.time(),  # shown to the job's watchers only
                )
            try:
                # Also the job's event stream's `progress` events (same throttle).
                publish_progress(self._context.redis, self._spec.job_id, progress)
            except redis.RedisError as exc:
                # Progress is a courtesy; a Redis outage must not fail the render.
                log.warning(
                    "job %s: progress not written (%s)", self._spec.job_id, type(exc).__name__
                )
            with self._state:
                if not self._dirty:
                    self._writing = False
                    return

    def should_stop(self) -> bool:
        """Stop at this step if cancelled, past the deadline, or the attempt is over."""
        if self._run.stop_render.is_set() or self._run.lease.lost.is_set():
            return True
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self.deadline_passed = True
            return True
        try:
            return is_cancel_requested(self._context.redis, self._spec.job_id)
        except redis.RedisError:
            return False
