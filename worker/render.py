"""One render job, end to end: claim, render, store, record, settle, announce.

Two threads share the work, so the device never waits for the CPU. The render
thread (the Celery task) claims a job and runs the pipeline; each finished image
goes through a bounded queue to the post-processing thread, which encodes,
stores and records it while the next image, or the next job, renders, and ends
the job once all its images are recorded. The database is touched only in
short transactions, never during a render, and every write carries the claimed
attempt number.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, Final, TypeVar

import redis
import torch
from PIL import Image
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.errors import StaleAttempt
from shared.jobs.cache import cache_key
from shared.jobs.events import (
    Progress,
    announce_job_finished,
    is_cancel_requested,
    publish_job_state,
    publish_progress,
)
from shared.jobs.imaging import encode_image
from shared.jobs.transitions import (
    DEADLINE_ERROR,
    RenderSpec,
    claim_job,
    fail_job,
    finish_job,
    image_storage_key,
    record_image,
    renew_lease,
)
from shared.metrics.counters import (
    ClaimFacts,
    ImageRecorded,
    MetricEvent,
    QueueWait,
    RenderTime,
    RequestFinished,
    claim_facts,
    record,
)
from shared.models import JobState, utcnow
from shared.scheduling.fleet import count_settling, record_render_speed, wake_dispatcher
from shared.scheduling.order import work_units
from shared.settings import Settings
from shared.storage import ResultStorage
from worker.memory import MIB, MemoryModel, plan_chunks
from worker.pipeline import KolorsRenderer

log = logging.getLogger(__name__)
T = TypeVar("T")

# Rendered images (and job ends) waiting for the post-processing thread. The render
# thread blocks while the queue is full, so a slow store holds at most this many decoded
# images in host memory (12 MiB each at 2048x2048), not a backlog; a few absorb a store
# that is now and then slower than a render.
POST_QUEUE_SIZE: Final = 4
# An idle post-processing thread ends after this long and starts again with the next image.
POST_IDLE_EXIT_S: Final = 10.0
# The sliding window of the busy fraction a worker reports in its heartbeat.
BUSY_WINDOW_S: Final = 60.0

RENDER_FAILED: Final = "The render failed on the worker; the credits were released"
OUT_OF_MEMORY: Final = (
    "Out of GPU memory for this size and number of images; the credits were released"
)


class BusyMeter:
    """Time spent inside pipeline calls, as a fraction of wall time: recent and since start."""

    def __init__(
        self, window_s: float = BUSY_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._window_s = window_s
        self._started = clock()
        self._lock = threading.Lock()
        self._spans: deque[tuple[float, float]] = deque()
        self._total = 0.0
        self._since: float | None = None  # start of the call in progress

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Count the time inside this block as busy."""
        start = self._clock()
        with self._lock:
            self._since = start
        try:
            yield
        finally:
            end = self._clock()
            with self._lock:
                self._since = None
                self._total += end - start
                self._spans.append((start, end))
                while self._spans and self._spans[0][1] <= end - self._window_s:
                    self._spans.popleft()

    @property
    def busy_s(self) -> float:
        """Seconds spent inside finished calls since start."""
        with self._lock:
            return self._total

    def fractions(self) -> tuple[float, float]:
        """Busy fraction over the window (or since start, if shorter) and since start."""
        now = self._clock()
        with self._lock:
            spans = list(self._spans)
            total = self._total
            if self._since is not None:
                spans.append((self._since, now))
                total += now - self._since
        window_start = max(self._started, now - self._window_s)
        recent = sum(max(0.0, end - max(start, window_start)) for start, end in spans)
        return _ratio(recent, now - window_start), _ratio(total, now - self._started)


def _ratio(busy: float, wall: float) -> float:
    return round(min(1.0, max(0.0, busy / wall)), 3) if wall > 0 else 0.0


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
    busy: BusyMeter = field(default_factory=BusyMeter)
    _post: PostProcessor | None = field(default=None, init=False, repr=False)
    _post_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def post(self) -> PostProcessor:
        """The post-processing thread's queue (created on first use)."""
        with self._post_lock:
            if self._post is None:
                self._post = PostProcessor(self)
            return self._post

    def close(self) -> int:
        """Wait until every queued image is stored and recorded (worker shutdown); how many."""
        return self.post.drain()


class JobRun:
    """One claimed attempt of a job, shared by the render and post-processing threads."""

    def __init__(
        self, context: WorkerContext, spec: RenderSpec, facts: ClaimFacts | None = None
    ) -> None:
        self.spec = spec
        self._context = context
        self.facts = facts  # for the metrics: unit price, submission and start times
        self.render_s = 0.0  # time in pipeline calls (render thread; read once it settled)
        self.lease = _LeaseKeeper(context, spec)
        self.reporter = _ProgressReporter(context, spec, self)
        # Set by the post-processing thread when the attempt ended early (a failed store,
        # a lost claim): the render stops at its next step.
        self.stop_render = threading.Event()
        self._settled = threading.Event()
        self._settling = False  # counted as settling (see mark_rendered)
        self._ending = False  # settle() has begun
        self._lock = threading.Lock()
        self.state: str | None = None

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

    def settle(self, state: str | None) -> None:
        """End the attempt: stop its render and lease; announce the job's end if it ended."""
        with self._lock:
            if self._ending:
                return
            self._ending = True
            was_settling, self._settling = self._settling, False
        if was_settling:
            with contextlib.suppress(redis.RedisError):  # the next start resets the count
                count_settling(self._context.redis, self._context.name, -1)
        self.state = state
        self.stop_render.set()
        self.lease.stop()
        if state is not None:
            # Counted before the announcement, so whoever it wakes sees the count.
            _count_settled(self._context, self, state)
            # Only a settled job is announced: a waiter woken early would report a false failure.
            _announce_settled(self._context, self.spec.job_id, state)
            log.info("job %s attempt %d: %s", self.spec.job_id, self.spec.attempt, state)
        self._settled.set()

    def stop_reason(self) -> str | None:
        """Why the render stopped early, for the job's end: the deadline, or None."""
        return DEADLINE_ERROR if self.reporter.deadline_passed else None


@dataclass(frozen=True)
class _RenderedImage:
    """An image to encode, store and record; `finish` ends the job in the same transaction."""

    run: JobRun
    index: int
    image: Image.Image
    record: dict[str, Any]  # the generation record, built beside the pipeline it describes
    finish: bool = False
    stopped_because: str | None = None
    render_s: float | None = None  # the call's time, on the first image of each call
    call_images: int = 1


@dataclass(frozen=True)
class _JobEnd:
    """The end of a job's render that no image carries: finish, fail, or leave to recovery."""

    run: JobRun
    error: str | None = None
    drop: bool = False
    stopped_because: str | None = None


_Item = _RenderedImage | _JobEnd


class PostProcessor:
    """A thread that encodes, stores and records images and ends jobs, in the order queued."""

    def __init__(self, context: WorkerContext, maxsize: int = POST_QUEUE_SIZE) -> None:
        self._context = context
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # submitted and not yet processed
        self._thread: threading.Thread | None = None

    def submit(self, item: _Item) -> None:
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
                item.run.settle(None)
            finally:
                with self._idle:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()


class _ProgressReporter:
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
                progress = Progress(
                    attempt=self._spec.attempt,
                    step=self._step,
                    steps=self._steps,
                    images_done=self.images_done,
                    images=self._spec.params.number_of_images,
                    updated_at=time.time(),
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
        deadline = self._spec.deadline_at
        if deadline is not None and utcnow() >= deadline:
            self.deadline_passed = True
            return True
        try:
            return is_cancel_requested(self._context.redis, self._spec.job_id)
        except redis.RedisError:
            return False


class _LeaseKeeper:
    """Renews the claim's lease every third of its length until the job is settled."""

    def __init__(self, context: WorkerContext, spec: RenderSpec) -> None:
        self._context = context
        self._spec = spec
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (the job is settled, or left to recovery)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
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
            if not held and not self._stop.is_set():
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


# ---------------------------------------------------------------- the render thread


def start_render_job(context: WorkerContext, job_id: str) -> JobRun | None:
    """Claim and render a job, queueing its images; returns once rendered, before it settles.

    The post-processing thread stores, records and ends the job (`JobRun.wait`); None if
    the job is not claimable (a message for a job that is not released is a no-op).
    """
    lease = timedelta(seconds=context.settings.lease_s)
    claimed = _with_db_retry(context, lambda session: _claim(session, job_id, context.name, lease))
    if claimed is None:
        log.info("job %s is not claimable (already taken, finished or cancelled); skipping", job_id)
        return None
    spec, facts = claimed
    log.info(
        "job %s attempt %d: rendering %d image(s)",
        job_id,
        spec.attempt,
        len(spec.pending_indices()),
    )
    run = JobRun(context, spec, facts)
    run.lease.start()
    _announce_started(context, spec)
    if spec.attempt == 1 and facts is not None:  # a job's first start: its wait in the queue
        record(context.redis, QueueWait(spec.tenant_id, facts.queue_wait_s))
    end: _JobEnd | None
    context.current_job = job_id
    try:
        end = _render_pending_images(context, run)
    except torch.OutOfMemoryError:
        log.error("job %s: out of device memory", job_id)
        end = _JobEnd(run, error=OUT_OF_MEMORY)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        log.exception("job %s: render failed", job_id)
        end = _JobEnd(run, error=RENDER_FAILED)
    except BaseException:
        # The process is going down: what was rendered is still stored and recorded
        # (the drain), and the job is left RUNNING for lease recovery, as after a crash.
        context.post.submit(_JobEnd(run, drop=True))
        raise
    finally:
        context.current_job = None
    # After the images already queued: a job ends only once they are recorded.
    if end is not None:
        context.post.submit(end)
    run.mark_rendered()
    return run


def run_render_job(context: WorkerContext, job_id: str) -> None:
    """Render a job and wait until it is settled; a no-op for a job that is not claimable."""
    run = start_render_job(context, job_id)
    if run is not None:
        run.wait()


def _render_pending_images(context: WorkerContext, run: JobRun) -> _JobEnd | None:
    """Render the pending images in memory-sized calls; the job's end, None if an image ends it."""
    spec = run.spec
    params = spec.params
    settings = context.settings
    reporter = run.reporter
    memory = MemoryModel(
        bytes_per_megapixel=settings.memory_per_megapixel_mb * MIB,
        reserve_bytes=settings.memory_reserve_mb * MIB,
    )
    per_call = context.renderer.images_per_call(params, settings.render_batch_size, memory)
    calls = plan_chunks(spec.pending_indices(), per_call)
    reporter.write(0, params.steps)
    for number, indices in enumerate(calls):
        started = time.monotonic()
        with context.busy.measure():
            images = context.renderer.render(
                params, [spec.image_seed(i) for i in indices], reporter.step, reporter.should_stop
            )
        render_s = time.monotonic() - started
        run.render_s += render_s  # a call stopped midway used the device too
        if images is None:
            log.info("job %s: stopped mid-render", spec.job_id)
            return _stopped(run)
        last_call = number == len(calls) - 1
        for position, (index, image) in enumerate(zip(indices, images, strict=True)):
            finish = last_call and position == len(indices) - 1
            context.post.submit(
                _RenderedImage(
                    run,
                    index,
                    image,
                    context.renderer.generation_record(params, spec.image_seed(index)),
                    finish=finish,
                    stopped_because=run.stop_reason() if finish else None,
                    render_s=render_s if position == 0 else None,
                    call_images=len(indices),
                )
            )
        if not last_call and reporter.should_stop():
            return _stopped(run)
    # Nothing was pending (an earlier attempt delivered every image): end the job now.
    return _JobEnd(run) if not calls else None


def _stopped(run: JobRun) -> _JobEnd:
    """The end of a render stopped early: a cancel or deadline ends the job, else recovery."""
    if run.settled or run.lease.lost.is_set():
        return _JobEnd(run, drop=True)
    return _JobEnd(run, stopped_because=run.stop_reason())


# ---------------------------------------------------------------- the post-processing thread


def _post_process(context: WorkerContext, item: _Item) -> None:
    """Store and record one image, or end a job; an attempt that is over drops the rest."""
    run = item.run
    spec = run.spec
    if run.settled:
        return
    if run.lease.lost.is_set():
        log.warning("job %s: attempt %d lost its claim; dropping its work", *_ids(spec))
        run.settle(None)
        return
    try:
        if isinstance(item, _RenderedImage):
            _store_and_record(context, item)
        elif item.error is not None:
            _fail(context, run, item.error)
        elif item.drop:
            run.settle(None)
        else:
            state = _with_db_retry(
                context,
                lambda session: finish_job(
                    session, spec.job_id, spec.attempt, item.stopped_because
                ),
            )
            run.settle(state.value)
    except StaleAttempt:
        # Another attempt owns the job now (a lease expired); it settles, not us.
        log.warning("job %s: attempt %d lost its claim; dropping its work", *_ids(spec))
        run.settle(None)
    except (OperationalError, InterfaceError):
        # Not the render's fault: leave the job RUNNING; its lease expires and recovery
        # requeues it once the database is back.
        log.exception("job %s: database unreachable; leaving the job to recovery", spec.job_id)
        run.settle(None)
    except Exception:
        log.exception("job %s: storing an image failed", spec.job_id)
        _fail(context, run, RENDER_FAILED)


def _ids(spec: RenderSpec) -> tuple[str, int]:
    return spec.job_id, spec.attempt


def _store_and_record(context: WorkerContext, item: _RenderedImage) -> None:
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
    context.storage.put(key, data, content_type)
    fingerprint = context.renderer.render_fingerprint
    image_key = cache_key(params, seed, fingerprint) if fingerprint is not None else None
    state = _with_db_retry(
        context,
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
            finish=item.finish,
            stopped_because=item.stopped_because,
            cache_key=image_key,
        ),
    )
    if run.facts is not None:
        record(context.redis, ImageRecorded(spec.tenant_id, run.facts.price_per_image))
    if state is not None:
        run.settle(state.value)
    else:
        run.reporter.image_recorded()


def _fail(context: WorkerContext, run: JobRun, error: str) -> None:
    """Fail the job (fenced by the attempt) and release its credits."""
    spec = run.spec
    try:
        failed = _with_db_retry(
            context,
            lambda session: fail_job(session, spec.job_id, error, attempt=spec.attempt),
        )
    except (OperationalError, InterfaceError):
        log.exception("job %s: database unreachable; leaving the job to recovery", spec.job_id)
        run.settle(None)
        return
    run.settle(JobState.FAILED.value if failed else None)


def _claim(
    session: Session, job_id: str, worker: str, lease: timedelta
) -> tuple[RenderSpec, ClaimFacts | None] | None:
    """Claim a job, and read in the same transaction what its metrics need."""
    spec = claim_job(session, job_id, worker, lease)
    return None if spec is None else (spec, claim_facts(session, job_id))


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


def _announce_started(context: WorkerContext, spec: RenderSpec) -> None:
    """Tell the job's event streams it is PROCESSING (after the claim's commit)."""
    progress = Progress(
        attempt=spec.attempt,
        step=0,
        steps=spec.params.steps,
        images_done=len(spec.delivered),
        images=spec.params.number_of_images,
        updated_at=time.time(),
    )
    try:
        publish_job_state(context.redis, spec.job_id, JobState.RUNNING.value, progress)
    except redis.RedisError as exc:
        # Streams re-read the job's row now and then; the render goes on.
        log.warning("job %s: start not announced (%s)", spec.job_id, type(exc).__name__)


def _record_speed(context: WorkerContext, spec: RenderSpec, images: int, seconds: float) -> None:
    params = spec.params
    work = work_units(params.width * params.height * params.steps * images)
    with contextlib.suppress(redis.RedisError):  # only the ETA would be less informed
        record_render_speed(context.redis, context.name, seconds / work)
