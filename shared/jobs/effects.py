"""What must happen after a job's transition commits: announcements, metrics, wake-ups.

Transitions record effects on their session (`after_commit`); nothing is sent
before the commit, so no waiter is woken and nothing is counted for a change that
could still roll back, and a rollback drops them. One listener, installed by
`install_publisher` on every session factory a process opens (`shared.resources`),
publishes a committed transaction's effects in one Redis pipeline, whoever the
caller is: an API view, a worker, the dispatcher.

One policy for a Redis failure there: log it and drop the effects, never raise.
The commit stands, SQL is the source of truth, and each effect is recovered
without Redis: waiters and event streams re-read the job row, the dispatcher
passes on its own every tick, and a cancel recorded in SQL ends a running job
CANCELLED when it finishes. Only the metric counts of that moment are lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import redis
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from shared.jobs.events import StepProgress, queue_cancel_request, queue_job_ended, queue_job_state
from shared.metrics.counters import (
    ImageRecorded,
    MetricEvent,
    QueueWait,
    RequestFinished,
    RequestSubmitted,
)
from shared.scheduling.fleet import queue_wake

log = logging.getLogger(__name__)

_EFFECTS: Final = "kolors_farm_after_commit"
_PUBLISHER: Final = "kolors_farm_publisher"


@dataclass(frozen=True)
class JobSubmitted:
    """A request was accepted; a QUEUED one wakes the dispatcher to release it."""

    tenant_id: int
    queued: bool = True


@dataclass(frozen=True)
class JobStarted:
    """A worker claimed the job (RUNNING); its first start counts its wait in the queue."""

    job_id: str
    tenant_id: int
    progress: StepProgress
    queue_wait_s: float | None = None


@dataclass(frozen=True)
class JobRequeued:
    """A job went back in line (its worker was lost); it wakes the dispatcher."""

    job_id: str


@dataclass(frozen=True)
class ImageDelivered:
    """An image was recorded and charged `millicredits` (rendered, or from the cache)."""

    tenant_id: int
    millicredits: int
    cached: bool = False


@dataclass(frozen=True)
class JobEnded:
    """A job reached COMPLETED, FAILED or CANCELLED; one in flight frees a worker's slot."""

    job_id: str
    tenant_id: int
    state: str
    freed_slot: bool


@dataclass(frozen=True)
class CancelRequested:
    """A running job must stop at its next step (a cancel, or its deadline)."""

    job_id: str


@dataclass(frozen=True)
class Counted:
    """A metric event with no job transition of its own (a render's time)."""

    metric: MetricEvent


Effect = (
    JobSubmitted | JobStarted | JobRequeued | ImageDelivered | JobEnded | CancelRequested | Counted
)


def after_commit(session: Session, *effects: Effect) -> None:
    """Record effects to publish once this session's transaction commits."""
    session.info.setdefault(_EFFECTS, []).extend(effects)


def pending_effects(session: Session) -> list[Effect]:
    """The effects recorded so far in this session's transaction (for tests and callers)."""
    found: list[Effect] = session.info.get(_EFFECTS, [])
    return list(found)


def _metrics(effect: Effect) -> list[MetricEvent]:
    match effect:
        case JobSubmitted(tenant_id=tenant_id):
            return [RequestSubmitted(tenant_id)]
        case JobStarted(tenant_id=tenant_id, queue_wait_s=wait) if wait is not None:
            return [QueueWait(tenant_id, wait)]
        case ImageDelivered(tenant_id=tenant_id, millicredits=price, cached=cached):
            return [ImageRecorded(tenant_id, price, cached=cached)]
        case JobEnded(tenant_id=tenant_id, state=state):
            return [RequestFinished(tenant_id, state)]
        case Counted(metric=metric):
            return [metric]
    return []


def _queue(pipe: Any, effect: Effect) -> bool:
    """Queue an effect's announcement on the pipeline; True if it wakes the dispatcher."""
    match effect:
        case JobSubmitted(queued=queued):
            return queued
        case JobStarted(job_id=job_id, progress=progress):
            queue_job_state(pipe, job_id, "RUNNING", progress)
        case JobRequeued(job_id=job_id):
            queue_job_state(pipe, job_id, "QUEUED")
            return True  # back in line: the dispatcher releases it again
        case JobEnded(job_id=job_id, state=state, freed_slot=freed_slot):
            queue_job_ended(pipe, job_id, state)
            return freed_slot
        case CancelRequested(job_id=job_id):
            queue_cancel_request(pipe, job_id)
    return False


def publish(client: redis.Redis, effects: list[Effect]) -> None:
    """Send committed effects in one round trip; a failure is logged and dropped, never raised."""
    if not effects:
        return
    try:
        with client.pipeline(transaction=False) as pipe:
            # Counted before announced: whoever an announcement wakes sees the count.
            for effect in effects:
                for metric in _metrics(effect):
                    metric.apply(pipe)
            wake = False
            for effect in effects:
                wake = _queue(pipe, effect) or wake
            if wake:
                queue_wake(pipe)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning(
            "%d after-commit effect(s) not published (%s); SQL holds the change",
            len(effects),
            type(exc).__name__,
        )


def _publish_committed(session: Session) -> None:
    effects: list[Effect] = session.info.pop(_EFFECTS, [])
    publisher: Callable[[list[Effect]], None] | None = session.info.get(_PUBLISHER)
    if effects and publisher is not None:
        try:
            publisher(effects)
        except Exception:
            # The commit is done; raising here would tell the caller it failed.
            log.exception("after-commit effects not published")


def _drop_rolled_back(session: Session) -> None:
    session.info.pop(_EFFECTS, None)


def install_publisher(factory: sessionmaker[Session], client: redis.Redis) -> None:
    """Publish the effects of every transaction of `factory`'s sessions to `client`."""
    info: dict[str, Any] = factory.kw.setdefault("info", {})
    info[_PUBLISHER] = lambda effects: publish(client, effects)
    if not event.contains(Session, "after_commit", _publish_committed):
        event.listen(Session, "after_commit", _publish_committed)
        event.listen(Session, "after_rollback", _drop_rolled_back)
