"""Fault injection on real processes, on one host: workers killed, Redis paused, poison jobs.

Every test runs real subprocesses (Celery workers on the tiny checkpoint, the
dispatcher, the API under gunicorn) against a real Redis it owns and a real
PostgreSQL, injects one fault, waits (bounded) for the farm to recover, and then
audits the job table and the ledger: each job terminal, each image delivered
once, each charge made once, every balance equal to its ledger. Faults of a farm
spread over hosts (a host cut off, PostgreSQL stopped, Redis restarted empty, S3 or
the broker unreachable, the API host killed) are in tests/test_fleet.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from control.launcher import RedisServer, start_scratch_redis
from shared.db import make_engine, make_session_factory, read_only, transaction
from shared.jobs.audit import audit_books
from shared.models import TERMINAL_STATES, Job, JobImage, LedgerEntry, User
from shared.scheduling.fleet import DISPATCH_LOCK_KEY
from shared.storage import make_storage
from tests.conftest import empty_database
from tests.farms import FarmFactory, RunningFarm
from tests.processes import wait_for

pytestmark = pytest.mark.faults

FAST_RECOVERY = {
    "lease_s": "3",  # renewed every second; a dead worker's job is requeued after 3 s
    "redispatch_after_s": "2",
    "dispatch_interval_s": "0.5",
    "max_attempts": "3",
    "progress_interval_s": "0.2",
}
QUICK = {"prompt": "a fox", "width": 512, "height": 512, "steps": 1}  # 0.01 credits
SLOW = {"prompt": "a fox", "width": 768, "height": 768, "steps": 30}  # about 2 s per image


@pytest.fixture
def pg_url(postgres_database: str) -> str:
    return empty_database(postgres_database)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_scratch_redis(tmp_path / "redis")
    yield server
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
        server.process.terminate()
        server.process.wait(timeout=10)


class Farm:
    """A farm under test: its processes, its database, and audit helpers."""

    def __init__(self, running: RunningFarm) -> None:
        self.running = running
        self.processes = running.processes
        self.engine = make_engine(running.database_url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)

    def submit(
        self, key: str, params: dict[str, Any], headers: dict[str, str] | None = None
    ) -> str:
        response = httpx.post(
            f"{self.processes.api_url}/v2/kolors",
            json=params,
            headers={"x-api-key": key, **(headers or {})},
            timeout=30,
        )
        assert response.status_code == 202, response.text
        job_id: str = response.json()["request_id"]
        return job_id

    def job(self, job_id: str) -> Job:
        with transaction(self.sessions) as session:
            return session.get_one(Job, job_id)

    def wait_terminal(self, job_ids: list[str], timeout_s: float) -> None:
        def all_done() -> bool:
            with transaction(self.sessions) as session:
                terminal = [state.value for state in TERMINAL_STATES]
                live = session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.id.in_(job_ids), Job.state.not_in(terminal))
                )
            return live == 0

        wait_for(all_done, timeout_s, f"{len(job_ids)} job(s) to end", interval_s=0.3)

    def wait_running(self, job_id: str, attempt: int = 1, timeout_s: float = 60) -> None:
        def running() -> bool:
            job = self.job(job_id)
            assert job.state not in TERMINAL_STATES, f"job ended early: {job.state} {job.error}"
            return job.state == "RUNNING" and job.attempt == attempt

        wait_for(running, timeout_s, f"job {job_id} attempt {attempt} to run")

    def audit(self) -> None:
        """Every job terminal and settled once; every balance equals its ledger (audit_books)."""
        storage = make_storage(f"file://{self.running.data_dir / 'results'}")
        with read_only(self.sessions) as session:
            audit = audit_books(session, storage, require_terminal=True)
        assert audit.clean, audit.findings
        assert audit.jobs > 0

    def close(self) -> None:
        self.running.stop()
        self.engine.dispose()


@pytest.fixture
def start_farm(farms: FarmFactory) -> Iterator[Callable[..., Farm]]:
    """Starts the test's farms; each is stopped when the test ends.

    `start_farm(database_url, redis_url, workers=1, **settings)`: workers w0, w1, ..., the
    dispatcher and the API on that migrated database and that Redis, FAST_RECOVERY and
    `settings` (KOLORS_FARM_* overrides) set.
    """
    started: list[Farm] = []

    def start(database_url: str, redis_url: str, *, workers: int = 1, **settings: str) -> Farm:
        running = farms.start(
            "faults",
            workers=[f"w{index}" for index in range(workers)],
            # Fault tests count renders, holds and broker messages of identical requests:
            # the result cache would answer the repeats without any (tests/test_cache.py).
            settings=FAST_RECOVERY | {"cache": "false"} | settings,
            database_url=database_url,  # migrated already
            redis_url=redis_url,
            migrate=False,
        )
        started.append(Farm(running))
        return started[-1]

    try:
        yield start
    finally:
        for farm in started:
            farm.close()


def test_killed_worker_mid_render_completes_exactly_once_on_another(
    pg_url: str, own_redis: RedisServer, start_farm: Callable[..., Farm]
) -> None:
    farm = start_farm(pg_url, own_redis.url)
    key = farm.processes.create_user("ann", "20")
    job_id = farm.submit(key, SLOW | {"number_of_images": 3})
    farm.wait_running(job_id)
    wait_for(lambda: farm.job(job_id).images_done >= 1, 60, "the first image")
    farm.processes.kill("w0")  # kill -9 mid-render: no cleanup, its message stays unacked
    farm.processes.start_worker("w1")
    farm.wait_terminal([job_id], 120)
    job = farm.job(job_id)
    assert (job.state, job.attempt, job.images_done) == ("COMPLETED", 2, 3)
    assert job.worker == "w1"
    with transaction(farm.sessions) as session:
        images = session.scalars(select(JobImage).where(JobImage.job_id == job_id)).all()
        # The image the dead worker delivered is kept; the new attempt rendered the rest.
        assert {image.attempt for image in images} == {1, 2}
        captures = session.scalar(
            select(func.count()).where(LedgerEntry.job_id == job_id, LedgerEntry.kind == "capture")
        )
        assert captures == 3
    farm.audit()


def test_render_longer_than_the_visibility_timeout_runs_once(
    pg_url: str, own_redis: RedisServer, start_farm: Callable[..., Farm]
) -> None:
    # The broker redelivers the unacked message to the idle second worker after 2 s;
    # the SQL claim refuses it, so the job renders once and is charged once.
    farm = start_farm(pg_url, own_redis.url, workers=2, visibility_timeout_s="2")
    key = farm.processes.create_user("ann", "20")
    job_id = farm.submit(key, SLOW | {"number_of_images": 4})
    farm.wait_terminal([job_id], 180)
    job = farm.job(job_id)
    assert (job.state, job.attempt, job.images_done) == ("COMPLETED", 1, 4)
    logs = farm.processes.log("w0") + farm.processes.log("w1")
    assert f"job {job_id} is not claimable" in logs, "the message was never redelivered"
    farm.audit()


def test_paused_redis_then_resumed_workers_consume_again(
    pg_url: str, own_redis: RedisServer, start_farm: Callable[..., Farm]
) -> None:
    farm = start_farm(pg_url, own_redis.url)
    key = farm.processes.create_user("ann", "20")
    during = farm.submit(key, SLOW | {"number_of_images": 2})
    farm.wait_running(during)
    own_redis.process.send_signal(signal.SIGSTOP)
    time.sleep(12)  # past the clients' 10 s socket timeout
    own_redis.process.send_signal(signal.SIGCONT)
    after = [farm.submit(key, QUICK) for _ in range(3)]
    farm.wait_terminal([during, *after], 180)
    with transaction(farm.sessions) as session:
        states = session.scalars(select(Job.state).where(Job.id.in_([during, *after]))).all()
    assert set(states) == {"COMPLETED"}
    farm.audit()


def test_poison_job_fails_after_max_attempts_and_the_queue_drains(
    pg_url: str, own_redis: RedisServer, start_farm: Callable[..., Farm]
) -> None:
    farm = start_farm(pg_url, own_redis.url, max_attempts="2")
    key = farm.processes.create_user("ann", "20")
    poison = farm.submit(key, SLOW)
    for attempt in (1, 2):
        # The job kills every worker that takes it.
        farm.wait_running(poison, attempt=attempt, timeout_s=90)
        farm.processes.kill(f"w{attempt - 1}")
        farm.processes.start_worker(f"w{attempt}")
    farm.wait_terminal([poison], 60)
    job = farm.job(poison)
    assert (job.state, job.attempt) == ("FAILED", 2)
    assert "lost 2 times" in (job.error or "")
    body = httpx.get(
        f"{farm.processes.api_url}/v2/requests/{poison}/status", headers={"x-api-key": key}
    )
    assert body.status_code == 422 and body.json()["status"] == "FAILED"
    healthy = farm.submit(key, QUICK)
    farm.wait_terminal([healthy], 90)
    assert farm.job(healthy).state == "COMPLETED"
    farm.audit()
    with transaction(farm.sessions) as session:
        releases = session.scalar(
            select(func.count()).where(LedgerEntry.job_id == poison, LedgerEntry.kind == "release")
        )
    assert releases == 1


def test_a_thousand_concurrent_submissions_never_overdraw(
    pg_url: str, own_redis: RedisServer, start_farm: Callable[..., Farm]
) -> None:
    farm = start_farm(pg_url, own_redis.url, workers=2)
    key = farm.processes.create_user("ann", "4")  # 400 quick jobs at 0.01 credits each
    url = f"{farm.processes.api_url}/v2/kolors"

    def client_run(client_index: int) -> list[int]:
        codes = []
        with httpx.Client(timeout=60) as http:
            for _ in range(20):
                response = http.post(url, json=QUICK, headers={"x-api-key": key})
                codes.append(response.status_code)
        return codes

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = [code for chunk in pool.map(client_run, range(50)) for code in chunk]
    assert len(codes) == 1000
    assert codes.count(202) == 400
    assert codes.count(406) == 600
    with transaction(farm.sessions) as session:
        job_ids = list(session.scalars(select(Job.id)))
    assert len(job_ids) == 400
    farm.wait_terminal(job_ids, 300)
    farm.audit()
    with transaction(farm.sessions) as session:
        assert session.scalar(select(User.balance)) == 0
        completed = session.scalar(
            select(func.count()).select_from(Job).where(Job.state == "COMPLETED")
        )
    assert completed == 400


def test_a_single_job_is_not_starved_by_another_users_backlog(
    pg_url: str, own_redis: RedisServer, start_farm: Callable[..., Farm]
) -> None:
    farm = start_farm(pg_url, own_redis.url, dispatch_margin="1")
    heavy = farm.processes.create_user("heavy", "50")
    light = farm.processes.create_user("light", "5")
    with ThreadPoolExecutor(max_workers=8) as pool:
        backlog = list(pool.map(lambda _: farm.submit(heavy, QUICK | {"steps": 4}), range(200)))
    single = farm.submit(light, QUICK | {"steps": 4})
    status = httpx.get(
        f"{farm.processes.api_url}/v2/requests/{single}/status", headers={"x-api-key": light}
    ).json()
    farm.wait_terminal([single], 120)
    job = farm.job(single)
    assert job.state == "COMPLETED" and job.started_at is not None
    with transaction(farm.sessions) as session:
        overtaking = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.id.in_(backlog),
                Job.started_at > job.created_at,
                Job.started_at < job.started_at,
            )
        )
    # One busy worker plus a margin of one: at most two backlog jobs start before it.
    assert overtaking is not None and overtaking <= 2, overtaking
    if status["status"] == "QUEUED":
        assert status["queue_position"] <= 2
    with ThreadPoolExecutor(max_workers=8) as pool:  # end the backlog: cancel what has not run
        cancels = pool.map(
            lambda job_id: (
                httpx.delete(
                    f"{farm.processes.api_url}/v2/requests/{job_id}",
                    headers={"x-api-key": heavy},
                    timeout=30,
                ).status_code
            ),
            backlog,
        )
        assert set(cancels) == {200}
    farm.wait_terminal(backlog, 120)
    farm.audit()


def test_a_standby_dispatcher_takes_over_when_the_active_one_dies(
    pg_url: str, own_redis: RedisServer, start_farm: Callable[..., Farm]
) -> None:
    farm = start_farm(pg_url, own_redis.url)
    farm.processes.start_dispatcher("standby")
    client = redis.Redis.from_url(own_redis.url)

    def leader_pid() -> int | None:
        token = client.get(DISPATCH_LOCK_KEY)
        return int(token.decode().rsplit(":", 1)[1]) if isinstance(token, bytes) else None

    first = wait_for(leader_pid, 30, "an active dispatcher")
    by_pid = {proc.pid: name for name, proc in farm.processes.procs.items()}
    assert by_pid[first] in {"dispatcher", "standby"}
    farm.processes.kill(by_pid[first])
    key = farm.processes.create_user("ann", "20")
    job_id = farm.submit(key, QUICK)
    farm.wait_terminal([job_id], 60)
    assert farm.job(job_id).state == "COMPLETED"
    second = leader_pid()
    assert second is not None and second != first and by_pid[second] in {"dispatcher", "standby"}
    farm.audit()
