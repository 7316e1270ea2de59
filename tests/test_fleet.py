"""The farm across hosts: a data host, an API host and two worker hosts (tests/host_farm.py).

They share one set of hosts (the session's `host_farm`), so each test leaves it whole:
every fault is undone in a `finally`, and `whole_farm` restarts what a test killed and
checks that both workers send heartbeats again before the next test. Every fault test
ends with an audit of the books (shared/jobs/audit.py).

Worker host A's clock runs 5 minutes fast and worker host B's 5 minutes slow, in every
test here (tests/conftest.py's WORKER_CLOCK_OFFSETS).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import segmind
from PIL import Image
from sqlalchemy import func, select

from shared.db import transaction
from shared.jobs.audit import BooksAudit, audit_books
from shared.models import TERMINAL_STATES, Job, JobImage, JobState, LedgerEntry, User
from shared.storage import S3Storage
from tests.host_farm import BUCKET, S3_PORT, HostFarm
from tests.hosts import Host
from tests.processes import wait_for

pytestmark = pytest.mark.e2e

QUICK = {"prompt": "a lighthouse at dusk", "width": 512, "height": 512, "steps": 2}
# Several seconds of render on the tiny checkpoint: long enough to cut a host off mid-way.
SLOW = {"prompt": "a lighthouse at dusk", "width": 768, "height": 768, "steps": 40}


@pytest.fixture
def farm(host_farm: HostFarm) -> Iterator[HostFarm]:
    """The shared multi-host farm, made whole again after the test."""
    yield host_farm
    make_whole(host_farm)


def make_whole(farm: HostFarm) -> None:
    """Undo what a test did: every host reconnected, every process running, workers live."""
    for host in (farm.data, farm.api, *farm.workers.values()):
        host.reconnect()
    if farm.postgres is not None:
        try:
            with transaction(farm.sessions) as session:
                session.execute(select(1))
        except Exception:
            farm.postgres.start()
    if not farm.running(farm.data, "redis"):
        farm.start_redis()
    if not farm.running(farm.api, "dispatcher"):
        farm.start_dispatcher()
    if not farm.running(farm.api, "api"):
        farm.start_api()
    for host in farm.workers.values():
        if not farm.running(host, "worker"):
            farm.start_worker(host)
    farm.wait_for_workers(list(farm.workers.values()))


# --- helpers -----------------------------------------------------------------------------


def submit(farm: HostFarm, key: str, params: dict[str, Any], **headers: str) -> str:
    """Submit an async request from the client; its request id."""
    response = httpx.post(
        f"{farm.url}/v2/kolors", json=params, headers={"x-api-key": key, **headers}, timeout=30
    )
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def job_of(farm: HostFarm, job_id: str) -> Job:
    """The job's row, read now."""
    with transaction(farm.sessions) as session:
        return session.get_one(Job, job_id)


def wait_ended(farm: HostFarm, job_ids: list[str], timeout_s: float = 180) -> list[Job]:
    """Until every job is in an end state; their rows."""
    ended = [state.value for state in TERMINAL_STATES]

    def all_ended() -> list[Job] | None:
        try:
            with transaction(farm.sessions) as session:
                jobs = list(session.scalars(select(Job).where(Job.id.in_(job_ids))))
        except Exception:
            return None
        return jobs if all(job.state in ended for job in jobs) else None

    return wait_for(all_ended, timeout_s, f"{len(job_ids)} job(s) to end", interval_s=0.3)


def wait_running_on(farm: HostFarm, job_id: str, timeout_s: float = 60) -> Host:
    """Until the job runs; the worker host it runs on."""

    def running() -> str | None:
        job = job_of(farm, job_id)
        assert job.state not in TERMINAL_STATES, f"ended early: {job.state} {job.error}"
        return job.worker if job.state == JobState.RUNNING and job.worker else None

    worker = wait_for(running, timeout_s, f"job {job_id} to run")
    (host,) = [h for h in farm.workers.values() if farm.worker_name(h) == worker]
    return host


def audit(farm: HostFarm) -> BooksAudit:
    """Audit the books (every job ended), and fail with the findings if any."""
    storage = S3Storage(BUCKET, "farm", client=farm.s3())
    with transaction(farm.sessions) as session:
        books = audit_books(session, storage, require_terminal=True)
    assert books.clean, books.findings
    assert books.jobs > 0
    return books


def jobs_of(farm: HostFarm, user_name: str) -> list[str]:
    """The ids of the user's jobs."""
    with transaction(farm.sessions) as session:
        return list(
            session.scalars(
                select(Job.id).join(User, User.id == Job.user_id).where(User.name == user_name)
            )
        )


def ledger_kinds(farm: HostFarm, job_id: str) -> list[str]:
    """The kinds of the job's ledger entries, in order."""
    with transaction(farm.sessions) as session:
        return list(
            session.scalars(
                select(LedgerEntry.kind)
                .where(LedgerEntry.job_id == job_id)
                .order_by(LedgerEntry.id)
            )
        )


# --- across hosts --------------------------------------------------------------------------


def test_requests_render_on_both_worker_hosts_and_their_images_come_from_s3(
    farm: HostFarm,
) -> None:
    key = farm.create_user("across", "100")
    job_ids = [submit(farm, key, QUICK | {"seed": seed}) for seed in range(8)]
    jobs = wait_ended(farm, job_ids)
    assert {job.state for job in jobs} == {JobState.COMPLETED}
    # Two idle workers and eight jobs: both hosts render.
    assert {job.worker for job in jobs} == {farm.worker_name(h) for h in farm.workers.values()}
    s3 = farm.s3()
    for job_id in job_ids:
        status = httpx.get(
            f"{farm.url}/v2/requests/{job_id}", headers={"x-api-key": key}, timeout=30
        ).json()
        assert status["status"] == "COMPLETED", status
        (link,) = status["output"]
        # The link leads to the data host's S3 endpoint (signed), not through the API.
        assert link.startswith(farm.s3_endpoint), link
        fetched = httpx.get(link, timeout=30)
        assert fetched.status_code == 200
        assert Image.open(io.BytesIO(fetched.content)).size == (512, 512)
        with transaction(farm.sessions) as session:
            (image,) = session.scalars(select(JobImage).where(JobImage.job_id == job_id))
        stored = s3.get_object(Bucket=BUCKET, Key=f"farm/{image.storage_key}")  # type: ignore[attr-defined]
        assert stored["Body"].read() == fetched.content


def test_the_segmind_sdk_works_against_the_api_host(farm: HostFarm) -> None:
    key = farm.create_user("sdk-across", "10")
    client = segmind.SegmindClient(api_key=key, base_url=f"{farm.url}/v1", timeout=180)
    params = {
        "prompt": "山水画, misty mountains",
        "width": 512,
        "height": 512,
        "steps": 2,
        "seed": 7,
    }
    sync = client.run_sync("kolors", **params)
    assert Image.open(io.BytesIO(sync.content)).size == (512, 512)
    job = client.submit_async("kolors", **params, number_of_images=2, output_format="png")
    done = job.wait(timeout=180, interval=0.3)
    assert done["status"] == "COMPLETED"
    assert done["seeds"] == [7, 8]
    first = httpx.get(done["output"][0], timeout=30)
    assert first.status_code == 200
    assert Image.open(io.BytesIO(first.content)).format == "PNG"


def test_no_farm_process_is_told_of_loopback_or_another_hosts_folder(farm: HostFarm) -> None:
    hosts = [farm.data, farm.api, *farm.workers.values()]
    for host in (farm.api, *farm.workers.values()):
        env = farm.env_for(host)
        settings = {k: v for k, v in env.items() if k.startswith(("KOLORS_FARM_", "AWS_"))}
        assert not [v for v in settings.values() if "127.0.0.1" in v or "localhost" in v]
        for other in hosts:
            if other is not host:
                assert not [v for v in settings.values() if str(other.root) in v], other.name
        assert env["KOLORS_FARM_STORAGE_URL"].startswith("s3://")
        assert farm.data.address in env["KOLORS_FARM_DATABASE_URL"]
    # And the data host's services are not on the other hosts' loopback: a process there
    # that tried would find nothing.
    probe = (
        "import socket, sys\n"
        "try:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2)\n"
        "except OSError:\n    print('nothing')\n"
    )
    for port in ("5432", "6379", "9000"):
        result = farm.workers["worker-a"].run("python3", "-c", probe, port)
        assert result.stdout.strip() == "nothing", port


# --- a worker host cut off -----------------------------------------------------------------


def test_a_worker_host_partitioned_mid_render_its_job_completes_once_on_the_other(
    farm: HostFarm,
) -> None:
    key = farm.create_user("partition", "100")
    job_id = submit(farm, key, SLOW | {"seed": 99})
    host = wait_running_on(farm, job_id)
    (other,) = [h for h in farm.workers.values() if h is not host]
    host.cut_off()
    try:
        # Its heartbeats stop: within a few intervals the job is requeued and claimed by
        # the other host (attempt 2), without waiting out the lease.
        def on_other() -> bool:
            job = job_of(farm, job_id)
            return job.attempt >= 2 and job.worker == farm.worker_name(other)

        wait_for(on_other, 60, "the job to move to the other worker host")
        (job,) = wait_ended(farm, [job_id])
        assert job.state == JobState.COMPLETED
        assert job.worker == farm.worker_name(other)
    finally:
        host.reconnect()
    done_images = _images(farm, job_id)
    kinds_before = ledger_kinds(farm, job_id)
    # Healed, the cut-off worker wakes up with its stale attempt: its writes are refused.
    farm.wait_for_workers([host])
    wait_for(
        lambda: (
            "lost its claim" in farm.log(host, "worker")
            or "no longer holds the job" in farm.log(host, "worker")
        ),
        90,
        "the cut-off worker to notice its claim is gone",
    )
    assert _images(farm, job_id) == done_images
    assert ledger_kinds(farm, job_id) == kinds_before
    assert kinds_before.count("capture") == 1 and kinds_before.count("hold") == 1
    audit(farm)


def _images(farm: HostFarm, job_id: str) -> list[tuple[int, int, int]]:
    with transaction(farm.sessions) as session:
        rows = session.execute(
            select(JobImage.index, JobImage.attempt, JobImage.size_bytes)
            .where(JobImage.job_id == job_id)
            .order_by(JobImage.index)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


# --- clocks ----------------------------------------------------------------------------------


def test_worker_hosts_with_wrong_clocks_render_each_job_once(farm: HostFarm) -> None:
    # The hosts' clocks really are wrong (libfaketime), by the offsets the farm was given.
    for name, offset in farm.clock_offsets.items():
        host = farm.workers[name]
        shown = host.run(
            "env", *(f"{k}={v}" for k, v in farm.env_for(host).items() if "FAKETIME" in k
                     or k == "LD_PRELOAD"), "python3", "-c", "import time; print(time.time())"
        )  # fmt: skip
        assert abs(float(shown.stdout) - time.time() - offset) < 30, (name, shown.stdout)
    key = farm.create_user("clocks", "100")
    job_ids = [submit(farm, key, QUICK | {"steps": 6, "seed": s}) for s in range(10)]
    leases: dict[str, float] = {}

    def watch() -> bool:
        with transaction(farm.sessions) as session:
            now = session.scalar(select(func.now()))
            for job in session.scalars(select(Job).where(Job.id.in_(job_ids))):
                if job.state == JobState.RUNNING and job.lease_expires_at is not None:
                    assert now is not None
                    leases[job.worker or ""] = (job.lease_expires_at - now).total_seconds()
        return len(leases) == 2

    wait_for(watch, 120, "a running job on each worker host")
    jobs = wait_ended(farm, job_ids)
    # A lease written on a slow host's clock would be already over, one on a fast host's
    # 5 minutes too long; on the database's clock both are within the lease ahead.
    for worker, remaining in leases.items():
        assert 0 < remaining <= 60 + 2, (worker, remaining)
    assert {job.state for job in jobs} == {JobState.COMPLETED}
    assert {job.attempt for job in jobs} == {1}, "a job was rendered twice"
    assert {job.worker for job in jobs} == {farm.worker_name(h) for h in farm.workers.values()}
    audit(farm)


# --- the data host's services fail -----------------------------------------------------------


@pytest.mark.faults
def test_postgres_on_the_data_host_stopped_for_20_s_under_load(farm: HostFarm) -> None:
    assert farm.postgres is not None
    key = farm.create_user("pg-away", "100")
    accepted = [submit(farm, key, QUICK | {"steps": 6, "seed": s}) for s in range(6)]
    farm.postgres.stop()
    stopped_at = time.monotonic()
    refused: list[httpx.Response] = []
    try:
        ready = httpx.get(f"{farm.url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
        status = httpx.get(
            f"{farm.url}/v2/requests/{accepted[0]}/status", headers={"x-api-key": key}, timeout=30
        )
        assert status.status_code == 503 and status.headers["Retry-After"]
        while time.monotonic() - stopped_at < 20:
            response = httpx.post(
                f"{farm.url}/v2/kolors", json=QUICK, headers={"x-api-key": key}, timeout=30
            )
            if response.status_code == 202:
                accepted.append(response.json()["request_id"])
            else:
                refused.append(response)
            time.sleep(1)
    finally:
        farm.postgres.start()
    assert refused, "no write was refused while the database was away"
    for response in refused:
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) > 0
        assert response.headers["content-type"].startswith("application/problem+json")
    for host in (farm.api, *farm.workers.values()):
        for name in ("worker", "api", "dispatcher"):
            child = farm.supervisor.children.get(f"{host.name}/{name}")
            if child is not None:
                assert farm.running(host, name), f"{host.name}/{name} exited"
    jobs = wait_ended(farm, accepted, timeout_s=240)
    assert {job.state for job in jobs} == {JobState.COMPLETED}
    assert httpx.get(f"{farm.url}/readyz", timeout=30).status_code == 200
    audit(farm)


@pytest.mark.faults
def test_redis_on_the_data_host_restarted_empty_with_jobs_queued_and_running(
    farm: HostFarm,
) -> None:
    key = farm.create_user("redis-empty", "100")
    job_ids = [submit(farm, key, QUICK | {"steps": 12, "seed": s}) for s in range(8)]

    def some_running_some_queued() -> bool:
        states = [job_of(farm, job_id).state for job_id in job_ids]
        return JobState.RUNNING in states and JobState.QUEUED in states

    wait_for(some_running_some_queued, 60, "jobs running and jobs queued")
    dispatcher_log = len(farm.log(farm.api, "dispatcher"))
    farm.kill(farm.data, "redis")
    time.sleep(2)
    farm.start_redis()  # empty: persists nothing
    jobs = wait_ended(farm, job_ids, timeout_s=240)
    assert {job.state for job in jobs} == {JobState.COMPLETED}
    # The queued jobs' messages were lost with Redis: the dispatcher sent them again.
    assert "published again" in farm.log(farm.api, "dispatcher")[dispatcher_log:]
    audit(farm)


@pytest.mark.faults
def test_the_broker_unreachable_right_after_a_commit_the_job_still_runs(farm: HostFarm) -> None:
    key = farm.create_user("broker-away", "100")
    # The API host (the API and the dispatcher) loses Redis, not the database.
    farm.api.cut_off_from(farm.data, port=6379)
    try:
        job_ids = [submit(farm, key, QUICK | {"seed": s}) for s in range(3)]
        time.sleep(3)
        assert {job_of(farm, job_id).state for job_id in job_ids} == {JobState.QUEUED}
    finally:
        farm.api.reconnect()
    jobs = wait_ended(farm, job_ids, timeout_s=120)
    assert {job.state for job in jobs} == {JobState.COMPLETED}
    audit(farm)


@pytest.mark.faults
def test_s3_unreachable_while_storing_retried_through_an_outage_failed_cleanly_after_it(
    farm: HostFarm,
) -> None:
    key = farm.create_user("s3-away", "100")
    workers = list(farm.workers.values())
    for host in workers:
        host.cut_off_from(farm.data, port=S3_PORT)
    try:
        short = submit(farm, key, QUICK | {"seed": 1})
        host = wait_running_on(farm, short)
        wait_for(lambda: "retrying" in farm.log(host, "worker"), 30, "a store to fail")
    finally:
        for host in workers:
            host.reconnect()
    (job,) = wait_ended(farm, [short])
    assert (job.state, job.images_done) == (JobState.COMPLETED, 1)

    for host in workers:
        host.cut_off_from(farm.data, port=S3_PORT)
    try:
        # Longer than the workers' KOLORS_FARM_STORE_RETRY_S (10 s): the job fails.
        long = submit(farm, key, QUICK | {"seed": 2, "number_of_images": 2})
        (job,) = wait_ended(farm, [long], timeout_s=120)
    finally:
        for host in workers:
            host.reconnect()
    assert job.state == JobState.FAILED
    assert job.error is not None and "result store was unreachable" in job.error
    assert job.images_done == 0
    assert _images(farm, long) == []  # never a recorded image without its object
    assert ledger_kinds(farm, long) == ["hold", "release"]
    audit(farm)


# --- the API host killed ---------------------------------------------------------------------


@pytest.mark.faults
def test_the_api_host_killed_mid_sync_requests_their_jobs_complete_and_retries_match(
    farm: HostFarm,
) -> None:
    key = farm.create_user("api-killed", "100")
    keys = [f"sync-{index}" for index in range(4)]

    def sync_request(idempotency_key: str) -> httpx.Response | None:
        try:
            return httpx.post(
                f"{farm.url}/v1/kolors",
                json=QUICK | {"steps": 20, "seed": 5},
                headers={"x-api-key": key, "Idempotency-Key": idempotency_key},
                timeout=120,
            )
        except httpx.HTTPError:
            return None  # cut off by the host's death

    with ThreadPoolExecutor(len(keys)) as pool:
        pending = [pool.submit(sync_request, k) for k in keys]

        wait_for(lambda: len(jobs_of(farm, "api-killed")) == len(keys), 60, "the requests' jobs")
        farm.api.kill_all()  # the API and the dispatcher, as when the host loses power
        answers = [future.result() for future in pending]
    assert all(answer is None for answer in answers)
    farm.supervisor.poll()
    farm.start_dispatcher()
    farm.start_api()
    created = jobs_of(farm, "api-killed")
    jobs = wait_ended(farm, created, timeout_s=180)
    assert {job.state for job in jobs} == {JobState.COMPLETED}
    # A retry with the same key is the same request: its images, not a new job.
    for idempotency_key in keys:
        retried = sync_request(idempotency_key)
        assert retried is not None and retried.status_code == 200, retried
        assert retried.headers["x-request-id"] in created
    assert sorted(jobs_of(farm, "api-killed")) == sorted(created)
    audit(farm)
