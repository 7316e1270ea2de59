"""One claimed attempt of a job, shared by the render and post-processing threads.

`JobRun` owns the attempt's lease keeper and progress reporter, the flag that stops
its render, and its end: `settle` happens once, with a `JobOutcome`. The transition
that ended a job announced and counted its end, with the attempt's render time,
after its commit (`shared.jobs.effects`). One `LeftToRecovery` is neither.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING

import redis

from shared.jobs.transitions import DEADLINE_ERROR, RenderSpec
from shared.scheduling.fleet import count_settling, wake_dispatcher
from worker.lease import LeaseKeeper
from worker.outcome import Ended, JobOutcome, LeftToRecovery
from worker.progress import ProgressReporter

if TYPE_CHECKING:
    from worker.context import WorkerContext

log = logging.getLogger(__name__)


class JobRun:
    """One claimed attempt of a job, shared by the render and post-processing threads."""

    def __init__(self, context: WorkerContext, spec: RenderSpec) -> None:
        self.spec = spec
        self._context = context
        self.render_s = 0.0  # time in pipeline calls (render thread; read once it settled)
        self.lease = LeaseKeeper(context, spec)
        self.reporter = ProgressReporter(context, spec, self)
        # Set by the post-processing thread when the attempt ended early (a failed store,
        # a lost claim): the render stops at its next step.
        self.stop_render = threading.Event()
        self._settled = threading.Event()
        self._settling = False  # counted as settling (see mark_rendered)
        self._ending = False  # settle() has begun
        self._lock = threading.Lock()
        self.outcome: JobOutcome | None = None

    @property
    def settled(self) -> bool:
        """Whether this attempt is over: nothing more will be written for it."""
        return self._settled.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until this attempt is over; False on timeout."""
        return self._settled.wait(timeout_s)

    def mark_rendered(self) -> None:
        """The render is done but the job not yet settled: the device is free for the next job.

        The dispatcher counts it (and is woken), so it releases this worker's next job now
        rather than when this one's images are stored and recorded.
        """
        with self._lock:
            if self._ending:
                return
            self._settling = True
        try:
            count_settling(self._context.redis, self._context.name, 1)
            wake_dispatcher(self._context.redis)
        except redis.RedisError as exc:
            log.warning("job %s: render end not announced (%s)", self.spec.job_id, exc)

    def settle(self, outcome: JobOutcome) -> None:
        """End the attempt: stop its render and lease; log how it ended."""
        with self._lock:
            if self._ending:
                return
            self._ending = True
            was_settling, self._settling = self._settling, False
        if was_settling:
            with contextlib.suppress(redis.RedisError):  # the next start resets the count
                count_settling(self._context.redis, self._context.name, -1)
        self.outcome = outcome
        self.stop_render.set()
        self.lease.stop()
        match outcome:
            case Ended(state):
                log.info("job %s attempt %d: %s", self.spec.job_id, self.spec.attempt, state.value)
            case LeftToRecovery():
                pass  # recovery requeues it; whoever ends it then announces it
        self._settled.set()

    def stop_reason(self) -> str | None:
        """Why the render stopped early, for the job's end: the deadline, or None."""
        return DEADLINE_ERROR if self.reporter.deadline_passed else None
