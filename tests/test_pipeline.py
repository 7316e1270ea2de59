"""The pipelined worker: the next render runs while finished images are stored and recorded.

In-process on real parts: the real KolorsPipeline (tiny checkpoint), SQLite and PostgreSQL,
Redis, local disk. Order is observed, never timed: the renderer and the storage are
wrapped to log when each render call starts and each put() is called, and a put() may wait
(bounded) for an event of the render thread before it stores for real, so a worker that
rendered and post-processed one after the other would fail the assertions, not hang.
One test runs a real worker process and stops it with SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import torch
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import Engine, event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.accounts.ledger import get_balance, ledger_balance
from shared.celery_app import make_celery, publish_render
from shared.db import make_engine, make_session_factory, transaction
from shared.jobs.events import read_progress
from shared.jobs.params import KolorsParams
from shared.jobs.transitions import LeaseOutcome, recover_expired_leases, submit_job
from shared.migrate import migrate_database
from shared.models import Job, JobImage, LedgerEntry
from shared.redis_client import make_redis
from shared.scheduling.fleet import live_workers, settling_jobs
from shared.settings import Settings
from shared.storage import LocalStorage, StorageError
from tests.conftest import ApiUser, make_user, release_job
from tests.processes import FarmProcesses, farm_env, wait_for
from worker.app import heartbeat_loop, worker_info
from worker.busy import BusyMeter
from worker.context import WorkerContext
from worker.outcome import OUT_OF_MEMORY, RENDER_FAILED, STORE_UNREACHABLE
from worker.pipeline import KolorsRenderer, StepCallback, StopCheck
from worker.render import run_render_job, start_render_job

# How long a gate waits for the event it expects before letting the worker go on anyway
# (the test then fails on the order it recorded instead of hanging).
GATE_S = 20.0


class Timeline:
    """Events (kind, label) in the order the threads under test reached them."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str]] = []
        self._changed = threading.Condition()

    def add(self, kind: str, label: str) -> None:
        with self._changed:
            self._events.append((kind, label))
            self._changed.notify_all()

    def wait_for(self, kind: str, label: str, timeout_s: float = GATE_S) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: (kind, label) in self._events, timeout_s)

    def index(self, kind: str, label: str) -> int:
        with self._changed:
            return self._events.index((kind, label))

    def kinds(self, kind: str) -> list[str]:
        with self._changed:
            return [label for k, label in self._events if k == kind]


def image_label(job_id: str, index: int) -> str:
    return f"{job_id}/{index}"


class RecordingStorage(LocalStorage):
    """Local disk that logs each put(), may wait for an event first, and stores for real."""

    def __init__(
        self,
        root: Path,
        timeline: Timeline,
        before_put: Callable[[str, int], object] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        super().__init__(root)
        self.timeline = timeline
        self.before_put = before_put
        self.delay_s = delay_s

    def put(self, key: str, data: bytes, content_type: str) -> None:
        _tenant, job_id, name = key.split("/")
        index = int(name.split(".")[0])
        self.timeline.add("put", image_label(job_id, index))
        if self.before_put is not None:
            self.before_put(job_id, index)
        if self.delay_s:
            time.sleep(self.delay_s)  # a slow store (a far bucket)
        super().put(key, data, content_type)
        self.timeline.add("stored", image_label(job_id, index))


@dataclass
class RenderWatch:
    """Logs each render call by its first seed; optional hooks run on the render thread."""

    timeline: Timeline
    calls: list[list[int]] = field(default_factory=list)
    before_call: Callable[[int, list[int]], object] | None = None  # (call number, seeds)
    at_step: Callable[[list[int], int], object] | None = None  # (seeds, step)


@pytest.fixture
def timeline() -> Timeline:
    return Timeline()


@pytest.fixture
def context(
    settings: Settings,
    sessions: sessionmaker[Session],
    renderer: KolorsRenderer,
    tmp_path: Path,
    timeline: Timeline,
) -> Iterator[WorkerContext]:
    context = WorkerContext(
        name="pipeline-worker",
        settings=settings,
        sessions=sessions,
        redis=make_redis(settings.require_redis_url()),
        storage=RecordingStorage(tmp_path / "results", timeline),
        renderer=renderer,
    )
    yield context
    context.close()


@pytest.fixture
def watch(context: WorkerContext, timeline: Timeline) -> Iterator[RenderWatch]:
    renderer = context.renderer
    original = renderer.render
    watched = RenderWatch(timeline)

    def render(
        params: KolorsParams, seeds: list[int], on_step: StepCallback, should_stop: StopCheck
    ) -> list[Image.Image] | None:
        watched.calls.append(list(seeds))
        timeline.add("render", str(seeds[0]))
        if watched.before_call is not None:
            watched.before_call(len(watched.calls), seeds)

        def step(step: int, steps: int) -> None:
            on_step(step, steps)
            if watched.at_step is not None:
                watched.at_step(seeds, step)

        images = original(params, seeds, step, should_stop)
        timeline.add("rendered" if images is not None else "interrupted", str(seeds[0]))
        return images

    renderer.render = render  # type: ignore[method-assign]
    yield watched
    del renderer.render


def storage(context: WorkerContext) -> RecordingStorage:
    assert isinstance(context.storage, RecordingStorage)
    return context.storage


def queue(context: WorkerContext, user: ApiUser, **params: object) -> str:
    """Submit and release a small job (512x512, 4 steps unless overridden); its id."""
    fields = {"prompt": "a fox", "width": 512, "height": 512, "steps": 4, **params}
    with transaction(context.sessions) as session:
        job = submit_job(session, user.principal, KolorsParams.model_validate(fields), Decimal(1))
        return release_job(session, job.id)


def load(context: WorkerContext, job_id: str) -> Job:
    with transaction(context.sessions) as session:
        job = session.get_one(Job, job_id)
        _ = job.images
        return job


def job_row(sessions: sessionmaker[Session], job_id: str) -> tuple[str, int, int]:
    with transaction(sessions) as session:
        job = session.get_one(Job, job_id)
        return job.state, job.attempt, job.images_done


def wait_until(condition: Callable[[], bool], timeout_s: float = GATE_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ------------------------------------------------------------------ overlap


def test_image_i_plus_1_renders_while_image_i_is_stored_and_recorded(
    context: WorkerContext, alice: ApiUser, watch: RenderWatch, timeline: Timeline
) -> None:
    job_id = queue(context, alice, seed=100, number_of_images=3)
    recorded_at_render_start: list[int] = []
    watch.before_call = lambda _n, _seeds: recorded_at_render_start.append(
        job_row(context.sessions, job_id)[2]
    )
    # Image i is stored only once image i + 1 is rendering.
    storage(context).before_put = lambda _job, index: (
        None if index == 2 else timeline.wait_for("render", str(100 + index + 1))
    )
    run_render_job(context, job_id)

    for index in (0, 1):
        assert timeline.index("render", str(100 + index + 1)) < timeline.index(
            "stored", image_label(job_id, index)
        )
    # So when image k began rendering, image k - 1 was not yet recorded.
    assert len(recorded_at_render_start) == 3
    for k in (1, 2):
        assert recorded_at_render_start[k] < k
    job = load(context, job_id)
    assert job.state == "COMPLETED" and [image.index for image in job.images] == [0, 1, 2]


def test_the_task_returns_before_its_job_settles_and_the_next_job_renders_meanwhile(
    context: WorkerContext,
    alice: ApiUser,
    watch: RenderWatch,
    timeline: Timeline,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="worker")
    first = queue(context, alice, seed=1000, number_of_images=2)
    second = queue(context, alice, seed=2000)
    # The first job's images are stored only once the second job is rendering.
    storage(context).before_put = lambda job, _index: (
        timeline.wait_for("render", "2000") if job == first else None
    )

    run_first = start_render_job(context, first)  # what the Celery task runs
    assert run_first is not None and not run_first.settled
    # The task returned with both images rendered, none stored or recorded, the job held.
    assert job_row(context.sessions, first) == ("RUNNING", 1, 0)
    # ...and counted as settling, so the dispatcher sends this worker its next job now.
    assert settling_jobs(context.redis, [context.name]) == 1
    run_second = start_render_job(context, second)
    assert run_second is not None
    assert run_first.wait(60) and run_second.wait(60)
    assert settling_jobs(context.redis, [context.name]) == 0

    assert timeline.index("render", "2000") < timeline.index("stored", image_label(first, 0))
    done = load(context, first)
    assert done.state == "COMPLETED" and [image.index for image in done.images] == [0, 1]
    assert done.finished_at is not None
    assert all(image.created_at <= done.finished_at for image in done.images)
    assert load(context, second).state == "COMPLETED"
    # Both jobs ended on the post-processing thread, the first before the second.
    ends = [
        (record.getMessage(), record.threadName)
        for record in caplog.records
        if record.getMessage().endswith(": COMPLETED")
    ]
    assert ends == [
        (f"job {first} attempt 1: COMPLETED", "post-process"),
        (f"job {second} attempt 1: COMPLETED", "post-process"),
    ]


def test_a_job_costs_its_claim_and_one_write_per_image(
    context: WorkerContext, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    engine = sessions.kw["bind"]
    assert isinstance(engine, Engine)
    job_id = queue(context, alice, number_of_images=3)
    transactions: list[str] = []

    def on_commit(_connection: Any) -> None:
        transactions.append(threading.current_thread().name)

    event.listen(engine, "commit", on_commit)
    try:
        run_render_job(context, job_id)
    finally:
        event.remove(engine, "commit", on_commit)
    # The claim, then for each image a read of the claim just before its upload and one
    # write; the last image's write also ends the job. (A lease renewal may fall in
    # between on a slow machine: it is the lease keeper's, not the job's.)
    job_transactions = [name for name in transactions if name != "lease"]
    assert job_transactions == ["MainThread", *["post-process"] * 6]
    job = load(context, job_id)
    assert job.state == "COMPLETED" and job.images_done == 3 and job.finished_at is not None


def test_progress_counts_recorded_images_not_rendered_ones(
    context: WorkerContext, alice: ApiUser, watch: RenderWatch, timeline: Timeline
) -> None:
    context.settings = context.settings.model_copy(update={"progress_interval_s": 0.0})
    job_id = queue(context, alice, seed=300, number_of_images=3)
    seen: dict[int, int] = {}

    def before_put(_job: str, index: int) -> None:
        if index < 2:
            timeline.wait_for("render", str(300 + index + 1))
        progress = read_progress(context.redis, job_id)
        assert progress is not None
        seen[index] = progress.images_done

    storage(context).before_put = before_put
    run_render_job(context, job_id)
    # When image i is stored, i + 1 images are rendered (or rendering) and i recorded.
    assert seen == {0: 0, 1: 1, 2: 2}
    assert load(context, job_id).state == "COMPLETED"


# ------------------------------------------------------------------ failures


def test_a_store_failure_fails_the_job_and_stops_its_render_but_not_the_worker(
    context: WorkerContext, alice: ApiUser, watch: RenderWatch, timeline: Timeline
) -> None:
    job_id = queue(context, alice, seed=500, number_of_images=4, steps=30)

    def fail_once_the_next_image_renders(job: str, index: int) -> None:
        timeline.wait_for("render", "501")
        raise StorageError("the bucket is gone")

    storage(context).before_put = fail_once_the_next_image_renders
    context.settings = context.settings.model_copy(update={"store_retry_s": 0.0})  # no retry
    # The second render goes on only once the job has failed, so it must stop mid-render.
    watch.at_step = lambda seeds, step: (
        wait_until(lambda: job_row(context.sessions, job_id)[0] == "FAILED")
        if seeds == [501] and step == 1
        else None
    )
    run_render_job(context, job_id)

    assert watch.calls == [[500], [501]]
    assert timeline.kinds("interrupted") == ["501"]
    failed = load(context, job_id)
    assert (failed.state, failed.error, failed.images) == ("FAILED", STORE_UNREACHABLE, [])
    with transaction(context.sessions) as session:
        assert get_balance(session, alice.principal.user_id) == 10_000
        assert ledger_balance(session, alice.principal.user_id) == 10_000
    storage(context).before_put = None
    watch.at_step = None
    following = queue(context, alice)
    run_render_job(context, following)
    assert load(context, following).state == "COMPLETED"


def test_a_lost_claim_on_the_post_thread_drops_the_rest_and_stops_the_render(
    context: WorkerContext,
    alice: ApiUser,
    watch: RenderWatch,
    timeline: Timeline,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="worker")
    job_id = queue(context, alice, seed=600, number_of_images=4, steps=30)
    dropped = threading.Event()

    class Dropped(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "lost its claim" in record.getMessage():
                dropped.set()

    handler = Dropped()
    logging.getLogger("worker").addHandler(handler)

    def taken_over_while_storing(job: str, index: int) -> None:
        timeline.wait_for("render", "601")
        with transaction(context.sessions) as session:  # recovery gave it to another worker
            session.execute(
                update(Job).where(Job.id == job).values(attempt=Job.attempt + 1, worker="another")
            )

    storage(context).before_put = taken_over_while_storing
    watch.at_step = lambda seeds, step: (
        dropped.wait(GATE_S) if seeds == [601] and step == 1 else None
    )
    try:
        run_render_job(context, job_id)
    finally:
        logging.getLogger("worker").removeHandler(handler)

    assert watch.calls == [[600], [601]]
    assert timeline.kinds("interrupted") == ["601"]
    with transaction(context.sessions) as session:
        after = session.get_one(Job, job_id)
        # Attempt 1 neither recorded, nor finished, nor failed anything: attempt 2 owns it.
        assert (after.state, after.attempt, after.worker, after.images_done) == (
            "RUNNING",
            2,
            "another",
            0,
        )
        assert session.scalar(select(func.count()).where(JobImage.job_id == job_id)) == 0
        captures = session.scalar(
            select(func.count()).where(LedgerEntry.job_id == job_id, LedgerEntry.kind == "capture")
        )
        assert captures == 0


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RuntimeError("a kernel failed"), RENDER_FAILED),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), OUT_OF_MEMORY),
    ],
)
def test_a_render_error_still_records_the_images_already_rendered_then_fails(
    context: WorkerContext,
    alice: ApiUser,
    watch: RenderWatch,
    timeline: Timeline,
    error: Exception,
    message: str,
) -> None:
    job_id = queue(context, alice, seed=700, number_of_images=3)

    def second_call_fails(number: int, _seeds: list[int]) -> None:
        if number == 2:
            raise error

    def store_once_the_failing_call_started(_job: str, _index: int) -> None:
        timeline.wait_for("render", "701")

    watch.before_call = second_call_fails
    # Image 0 is still waiting to be stored when the render fails.
    storage(context).before_put = store_once_the_failing_call_started
    run_render_job(context, job_id)

    failed = load(context, job_id)
    assert (failed.state, failed.error) == ("FAILED", message)
    assert [image.index for image in failed.images] == [0]
    with transaction(context.sessions) as session:
        assert get_balance(session, alice.principal.user_id) == 10_000 - 40
        assert ledger_balance(session, alice.principal.user_id) == 10_000 - 40


def _short_lock_waits(engine: Engine, backend: str) -> None:
    """Make a write that finds the database locked fail fast, as if it were unreachable."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if backend == "sqlite":
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=100")
            cursor.close()


def test_a_database_outage_while_recording_is_retried_without_failing_the_job(
    context: WorkerContext,
    alice: ApiUser,
    database_url: str,
    sessions: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    kwargs: dict[str, Any] = {}
    if backend == "postgresql":
        kwargs["connect_args"] = {"options": "-c lock_timeout=100"}
    worker_engine = make_engine(database_url, **kwargs)
    _short_lock_waits(worker_engine, backend)
    context.sessions = make_session_factory(worker_engine)
    caplog.set_level(logging.WARNING, logger="worker")
    job_id = queue(context, alice, number_of_images=2)
    held = threading.Event()

    def hold_the_database() -> None:
        with transaction(sessions) as session:
            # SQLite: the write lock; PostgreSQL: the job's row. Either way the worker's
            # writes fail (OperationalError) for a while, then go through.
            session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
            held.set()
            time.sleep(2.5)

    blocker = threading.Thread(target=hold_the_database)

    def outage_before_the_first_record(_job: str, index: int) -> None:
        if index == 0:
            blocker.start()
            held.wait(GATE_S)

    storage(context).before_put = outage_before_the_first_record
    try:
        run_render_job(context, job_id)
    finally:
        if blocker.is_alive():
            blocker.join()
        worker_engine.dispose()

    retried = [
        record
        for record in caplog.records
        if record.getMessage().startswith("database unavailable")
    ]
    assert retried and {record.threadName for record in retried} == {"post-process"}
    job = load(context, job_id)
    assert job.state == "COMPLETED" and [image.index for image in job.images] == [0, 1]


def test_the_lease_is_renewed_while_the_last_image_waits_to_be_stored(
    context: WorkerContext, alice: ApiUser, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    context.settings = context.settings.model_copy(update={"lease_s": 2.0})
    storage(context).delay_s = 5.0  # storing takes longer than a lease
    job_id = queue(context, alice)
    outcomes: list[LeaseOutcome] = []
    stop = threading.Event()

    def recover() -> None:  # what the dispatcher does every pass
        while not stop.is_set():
            with transaction(sessions) as session:
                outcomes.extend(recover_expired_leases(session, max_attempts=3))
            stop.wait(0.1)

    recovery = threading.Thread(target=recover)
    recovery.start()
    try:
        run = start_render_job(context, job_id)
        assert run is not None and not run.settled  # rendered; its image is being stored
        assert run.wait(60)
    finally:
        stop.set()
        recovery.join()
    assert outcomes == []
    job = load(context, job_id)
    assert (job.state, job.attempt, len(job.images)) == ("COMPLETED", 1, 1)


# ------------------------------------------------------------------ shutdown


def test_close_drains_the_post_processing_queue(context: WorkerContext, alice: ApiUser) -> None:
    storage(context).delay_s = 1.0
    job_id = queue(context, alice, number_of_images=2)
    run = start_render_job(context, job_id)
    assert run is not None and not run.settled
    waiting = context.close()  # what run_worker does once Celery has stopped
    assert waiting >= 1 and run.settled
    job = load(context, job_id)
    assert job.state == "COMPLETED" and len(job.images) == 2


WORKER = "pipeline-cpu0"


@pytest.mark.e2e
def test_sigterm_lets_the_worker_finish_and_drain_before_it_exits(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate_database(database_url)
    env = farm_env(tmp_path / "var", database_url, redis_url, tiny_model_dir, warmup="false")
    processes = FarmProcesses(env=env, logs=tmp_path / "logs")
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    try:
        processes.start_worker(WORKER)
        processes.wait_for_workers({WORKER})
        user = make_user(sessions, "bob", 100_000)
        params = {"prompt": "a fox", "width": 512, "height": 512, "steps": 20}
        with transaction(sessions) as session:
            job = submit_job(
                session,
                user.principal,
                KolorsParams.model_validate({**params, "number_of_images": 3}),
                Decimal(1),
            )
            job_id = release_job(session, job.id)
        publish_render(make_celery(Settings(redis_url=redis_url)), job_id)
        wait_for(lambda: job_row(sessions, job_id)[0] == "RUNNING", 60, "the job to start")
        processes.kill(WORKER, signal.SIGTERM)  # waits for the process to exit
        assert processes.procs[WORKER].returncode == 0
        state, attempt, images_done = job_row(sessions, job_id)
        assert (state, attempt, images_done) == ("COMPLETED", 1, 3)
        assert "post-processing drained" in processes.log(WORKER)
        assert WORKER not in live_workers(make_redis(redis_url))
    finally:
        processes.stop_all()
        engine.dispose()


# ------------------------------------------------------------------ busy fraction


def test_busy_fraction_is_time_in_pipeline_calls_over_wall_time() -> None:
    now = [0.0]
    meter = BusyMeter(window_s=60.0, clock=lambda: now[0])
    now[0] = 10.0
    assert meter.fractions() == (0.0, 0.0)
    with meter.measure():
        now[0] = 40.0
    now[0] = 50.0
    assert meter.fractions() == (0.6, 0.6)  # 30 s busy of 50
    now[0] = 100.0
    assert meter.fractions() == (0.0, 0.3)  # nothing in the last minute
    with meter.measure():
        now[0] = 130.0
        # A call in progress counts: 30 s of the last 60, 60 s of 130 since start.
        assert meter.fractions() == (0.5, 0.462)


def test_heartbeat_and_readyz_report_the_busy_fraction(
    context: WorkerContext, alice: ApiUser, client: FlaskClient
) -> None:
    assert worker_info(context, {})["busy_fraction"] == 0.0
    run_render_job(context, queue(context, alice))
    stop = threading.Event()
    beating = threading.Thread(target=heartbeat_loop, args=(context, stop))
    beating.start()
    try:
        assert wait_until(lambda: context.name in live_workers(context.redis))
    finally:
        stop.set()
        beating.join()
    body = client.get("/readyz").get_json()
    info = body["workers"][context.name]
    for name in ("busy_fraction", "busy_fraction_since_start"):
        assert isinstance(info[name], float) and 0.0 < info[name] <= 1.0
        assert round(info[name], 3) == info[name]
