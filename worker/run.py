"""One claimed attempt of a job, shared by the render and post-processing threads.

`JobRun` owns the attempt's lease keeper and progress reporter, the flag that stops
its render, and its end: `settle` happens once, with a `JobOutcome`. A job that
`Ended` is then counted and announced (after the commit that ended it); one
`LeftToRecovery` is not.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING

import redis

from shared.jobs.events import announce_job_finished
from shared.jobs.transitions import DEADLINE_ERROR, RenderSpec
from shared.metrics.counters import ClaimFacts, MetricEvent, RenderTime, RequestFinished, record
from shared.scheduling.fleet import count_settling, wake_dispatcher
from worker.lease import LeaseKeeper
from worker.outcome import Ended, JobOutcome, LeftToRecovery
from worker.progress import ProgressReporter

if TYPE_CHECKING:
    from worker.context import WorkerContext

log = logging.getLogger(__name__)


class JobRun:
    """One claimed attempt of a job, shared by the render and post-processing threads."""

    def __init__(
        self, context: WorkerContext, spec: RenderSpec, facts: ClaimFacts | None = None
    ) -> None:
        self.spec = spec
        self._context = context
        self.facts = facts  # for the metrics: unit price, submission and start times
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
        """End the attempt: stop its render and lease; announce the job's end if it ended."""
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
                # Counted before the announcement, so whoever it wakes sees the count.
                _count_settled(self._context, self, state.value)
                # Only a settled job is announced: a waiter woken early would report a
                # false failure.
                _announce_settled(self._context, self.spec.job_id, state.value)
                log.info("job %s attempt %d: %s", self.spec.job_id, self.spec.attempt, state.value)
            case LeftToRecovery():
                pass  # recovery requeues it; whoever ends it then announces it
        self._settled.set()

    def stop_reason(self) -> str | None:
        """Why the render stopped early, for the job's end: the deadline, or None."""
        return DEADLINE_ERROR if self.reporter.deadline_passed else None


def _count_settled(context: WorkerContext, run: JobRun, state: str) -> None:
    """Count a job's end and its attempt's render time (one Redis round trip)."""
    events: list[MetricEvent] = [RequestFinished(run.spec.tenant_id, state)]
    if run.render_s > 0:
        events.append(RenderTime(run.spec.tenant_id, run.render_s))
    record(context.redis, *events)


def _announce_settled(context: WorkerContext, job_id: str, state: str) -> None:
    """Wake the job's waiters, and the dispatcher: a job left the farm."""
    try:
        announce_job_finished(context.redis, job_id, state)
        wake_dispatcher(context.redis)
    except redis.RedisError as exc:
        # Waiters fall back to reading the job row; nothing is lost.
        log.warning("job %s: end not announced (%s)", job_id, type(exc).__name__)
