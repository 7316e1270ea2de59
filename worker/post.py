"""The post-processing thread: encode, store and record each rendered image, and end jobs.

The render thread queues each finished image (and, when no image carries it, the
job's `RenderEnd`) here and goes on rendering the next image or the next job, so the
device never waits for the CPU. Items are processed in the order queued, each in
short transactions fenced by the claimed attempt; an attempt that is over drops the
rest of its items.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar, assert_never

import redis
from PIL import Image
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from shared.db import read_only
from shared.errors import StaleAttempt
from shared.jobs.cache import cache_key
from shared.jobs.effects import Counted, after_commit
from shared.jobs.imaging import encode_image
from shared.jobs.queries import attempt_holds
from shared.jobs.transitions import (
    RenderSpec,
    fail_job,
    finish_job,
    image_storage_key,
    record_image,
)
from shared.metrics.counters import RenderTime
from shared.models import JobState
from shared.scheduling.fleet import record_render_speed
from shared.scheduling.order import work_units
from worker.outcome import (
    RENDER_FAILED,
    STORE_UNREACHABLE,
    Ended,
    Fail,
    Finish,
    LeftToRecovery,
    RenderEnd,
)
from worker.retry import with_db_retry

if TYPE_CHECKING:
    from worker.context import WorkerContext
    from worker.run import JobRun

T = TypeVar("T")
log = logging.getLogger(__name__)

# Rendered images (and job ends) waiting for the post-processing thread. The render
# thread blocks while the queue is full, so a slow store holds at most this many decoded
# images in host memory (12 MiB each at 2048x2048), not a backlog; a few absorb a store
# that is now and then slower than a render.
POST_QUEUE_SIZE: Final = 4
# An idle post-processing thread ends after this long and starts again with the next image.
POST_IDLE_EXIT_S: Final = 10.0
# Pauses between tries of a failing store: doubling from the first, at most the second.
STORE_FIRST_BACKOFF_S: Final = 0.5
STORE_MAX_BACKOFF_S: Final = 8.0

_LOST_CLAIM: Final = "the attempt lost its claim"
_DATABASE_AWAY: Final = "the database is unreachable"


@dataclass(frozen=True)
class RenderedImage:
    """An image to encode, store and record; with `finish`, its job ends in the same transaction."""

    run: JobRun
    index: int
    image: Image.Image
    record: dict[str, Any]  # the generation record, built beside the pipeline it describes
    finish: Finish | None = None
    render_s: float | None = None  # the call's time, on the first image of each call
    call_images: int = 1


@dataclass(frozen=True)
class RenderEnded:
    """The end of a job's render that no image carries."""

    run: JobRun
    end: RenderEnd


PostItem = RenderedImage | RenderEnded


class PostProcessor:
    """A thread that encodes, stores and records images and ends jobs, in the order queued."""

    def __init__(self, context: WorkerContext, maxsize: int = POST_QUEUE_SIZE) -> None:
        self._context = context
        self._queue: queue.Queue[PostItem] = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # submitted and not yet processed
        self._thread: threading.Thread | None = None

    def submit(self, item: PostItem) -> None:
        """Queue an item for the thread; blocks while the queue is full."""
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="post-process", daemon=True)
                self._thread.start()
        self._queue.put(item)

    def drain(self, timeout_s: float | None = None) -> int:
        """Block until everything queued so far is processed; how many items were waiting."""
        with self._idle:
            waiting = self._pending
            self._idle.wait_for(lambda: self._pending == 0, timeout_s)
        return waiting

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=POST_IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    # `submit` counts an item before queueing it: none is on its way.
                    if self._pending == 0:
                        self._thread = None
                        return
                continue
            try:
                _post_process(self._context, item)
            except Exception:
                # Never lose the thread: the job is left to lease recovery, its waiters freed.
                log.exception("job %s: post-processing failed", item.run.spec.job_id)
                item.run.settle(LeftToRecovery("post-processing failed"))
            finally:
                with self._idle:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()


def _post_process(context: WorkerContext, item: PostItem) -> None:
    """Store and record one image, or end a job; an attempt that is over drops the rest."""
    run = item.run
    spec = run.spec
    if run.settled:
        return
    if run.lease.lost.is_set():
        log.warning("job %s: attempt %d lost its claim; dropping its work", *_ids(spec))
        run.settle(LeftToRecovery(_LOST_CLAIM))
        return
    try:
        match item:
            case RenderedImage():
                _store_and_record(context, item)
            case RenderEnded(end=end):
                _end_job(context, run, end)
    except StaleAttempt:
        # Another attempt owns the job now (a lease expired); it settles, not us.
        log.warning("job %s: attempt %d lost its claim; dropping its work", *_ids(spec))
        run.settle(LeftToRecovery(_LOST_CLAIM))
    except StoreUnreachable:
        log.exception("job %s: the result store stayed unreachable", spec.job_id)
        _fail(context, run, STORE_UNREACHABLE)
    except (OperationalError, InterfaceError):
        # Not the render's fault: leave the job RUNNING; its lease expires and recovery
        # requeues it once the database is back.
        log.exception("job %s: database unreachable; leaving the job to recovery", spec.job_id)
        run.settle(LeftToRecovery(_DATABASE_AWAY))
    except Exception:
        log.exception("job %s: storing an image failed", spec.job_id)
        _fail(context, run, RENDER_FAILED)


def _end_job(context: WorkerContext, run: JobRun, end: RenderEnd) -> None:
    """End a job as its render asked, once its queued images are recorded."""
    spec = run.spec
    match end:
        case Fail(error):
            _fail(context, run, error)
        case LeftToRecovery():
            run.settle(end)
        case Finish(stopped_because):
            state = with_db_retry(
                context,
                _ending(
                    run,
                    lambda session: finish_job(session, spec.job_id, spec.attempt, stopped_because),
                ),
            )
            run.settle(Ended(state))
        case _:
            assert_never(end)


def _ending(run: JobRun, transition: Callable[[Session], T]) -> Callable[[Session], T]:
    """`transition`, counting the attempt's render time with the job's end when it ends it."""

    def ending(session: Session) -> T:
        ended = transition(session)
        if ended and run.render_s > 0:  # an end state, or True for a failure recorded
            render_time = RenderTime(run.spec.tenant_id, run.render_s)
            after_commit(session, Counted(render_time))
        return ended

    return ending


def _ids(spec: RenderSpec) -> tuple[str, int]:
    return spec.job_id, spec.attempt


def _store_and_record(context: WorkerContext, item: RenderedImage) -> None:
    run = item.run
    spec = run.spec
    params = spec.params
    if item.render_s is not None:
        _record_speed(context, spec, item.call_images, item.render_s)
    seed = spec.image_seed(item.index)
    data, content_type = encode_image(
        item.image, params.output_format, params.output_quality, item.record
    )
    key = image_storage_key(spec.tenant_id, spec.job_id, item.index, params.output_format)
    # Stored before it is recorded: a recorded image always exists.
    _store(context, run, key, data, content_type)
    fingerprint = context.renderer.render_fingerprint
    image_key = cache_key(params, seed, fingerprint) if fingerprint is not None else None
    state = with_db_retry(
        context,
        _ending(
            run,
            partial(
                record_image,
                job_id=spec.job_id,
                attempt=spec.attempt,
                index=item.index,
                seed=seed,
                storage_key=key,
                content_type=content_type,
                size_bytes=len(data),
                generation=item.record,
                finish=item.finish is not None,
                stopped_because=item.finish.stopped_because if item.finish is not None else None,
                cache_key=image_key,
                user_id=spec.user_id,
            ),
        ),
    )
    if state is not None:
        run.settle(Ended(state))
    else:
        run.reporter.image_recorded()


class StoreUnreachable(Exception):
    """Storing an image kept failing for the whole `store_retry_s`."""


def _store(context: WorkerContext, run: JobRun, key: str, data: bytes, content_type: str) -> None:
    """Put an image, retried while the store fails, for at most `store_retry_s`.

    Raises StaleAttempt once the attempt lost its claim (its images are another's to
    store now), StoreUnreachable when the time is up.
    """
    give_up_at = time.monotonic() + context.settings.store_retry_s
    delay_s = STORE_FIRST_BACKOFF_S
    while True:
        if not _still_holds(context, run):
            raise StaleAttempt(run.spec.job_id)
        try:
            context.storage.put(key, data, content_type)
            return
        except ValueError:
            raise  # a bad key is a bug, not an outage
        except Exception as exc:
            if time.monotonic() + delay_s >= give_up_at:
                raise StoreUnreachable(key) from exc
            log.warning(
                "job %s: storing %s failed (%s); retrying", run.spec.job_id, key, type(exc).__name__
            )
        if run.lease.lost.wait(delay_s):
            raise StaleAttempt(run.spec.job_id)
        delay_s = min(STORE_MAX_BACKOFF_S, delay_s * 2)


def _still_holds(context: WorkerContext, run: JobRun) -> bool:
    """Whether the attempt still holds its job, asked just before an upload.

    The object's key is the job's, not the attempt's: an attempt that lost its claim
    (a host cut off and back) must not overwrite the images of the attempt that owns
    the job now, nor leave an object that no record names. Writes stay fenced in any
    case; this keeps the store as clean. With the database away it cannot tell: the
    upload goes ahead and its record is fenced as always.
    """
    try:
        with read_only(context.sessions) as session:
            return attempt_holds(session, run.spec.job_id, run.spec.attempt)
    except (OperationalError, InterfaceError):
        return True


def _fail(context: WorkerContext, run: JobRun, error: str) -> None:
    """Fail the job (fenced by the attempt) and release its credits."""
    spec = run.spec
    try:
        failed = with_db_retry(
            context,
            _ending(
                run, lambda session: fail_job(session, spec.job_id, error, attempt=spec.attempt)
            ),
        )
    except (OperationalError, InterfaceError):
        log.exception("job %s: database unreachable; leaving the job to recovery", spec.job_id)
        run.settle(LeftToRecovery(_DATABASE_AWAY))
        return
    # Not failed: the attempt no longer held a live job, so another attempt ends it.
    run.settle(Ended(JobState.FAILED) if failed else LeftToRecovery(_LOST_CLAIM))


def _record_speed(context: WorkerContext, spec: RenderSpec, images: int, seconds: float) -> None:
    params = spec.params
    work = work_units(params.width * params.height * params.steps * images)
    with contextlib.suppress(redis.RedisError):  # only the ETA would be less informed
        record_render_speed(context.redis, context.name, seconds / work)
