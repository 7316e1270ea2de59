"""A lost worker's jobs go back without waiting for their leases, fenced by the attempt."""

from __future__ import annotations

import time

import pytest
import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.errors import StaleAttempt
from shared.jobs.transitions import reclaim_claims_of
from shared.models import JobState
from shared.scheduling.fleet import forget_worker, lapsed_workers, live_workers, record_heartbeat
from shared.settings import Settings
from tests.conftest import ApiUser
from tests.test_dispatch import (
    books,
    celery_app,  # noqa: F401 - a fixture
    claim,
    deliver,
    load_job,
    make_dispatcher,
    redis_client,  # noqa: F401 - a fixture
    submit,
)


def test_a_restarted_workers_previous_claims_are_requeued_at_once(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    mine, other = submit(sessions, alice, 2), submit(sessions, alice)
    attempt = claim(sessions, mine, "cuda0@gpu-1")
    claim(sessions, other, "cuda1@gpu-1")
    deliver(sessions, mine, attempt, index=0)
    with transaction(sessions) as session:
        outcomes = reclaim_claims_of(session, ["cuda0@gpu-1"], max_attempts=3)
    assert [(o.job_id, o.state) for o in outcomes] == [(mine, JobState.QUEUED)]
    job = load_job(sessions, mine)
    # Back in line with its leases untouched elsewhere; the other device's job keeps running.
    assert job.state == JobState.QUEUED.value and job.worker is None and job.images_done == 1
    assert load_job(sessions, other).state == JobState.RUNNING.value
    # The previous life's late write is refused by the attempt fence; the next claim goes on.
    with pytest.raises(StaleAttempt):
        deliver(sessions, mine, attempt, index=1)
    assert claim(sessions, mine, "cuda0@gpu-1") == attempt + 1
    deliver(sessions, mine, attempt + 1, index=1)
    # One capture per image delivered, whichever attempt delivered it.
    assert books(sessions, alice) == 10_000 - 2 * 250 - 250


def test_a_reclaim_with_no_claims_changes_nothing(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job_id = submit(sessions, alice)
    claim(sessions, job_id, "cpu0@host")
    with transaction(sessions) as session:
        assert reclaim_claims_of(session, ["cpu1@host"], max_attempts=3) == []
        assert reclaim_claims_of(session, [], max_attempts=3) == []
    assert load_job(sessions, job_id).state == JobState.RUNNING.value


def test_a_worker_out_of_attempts_fails_its_job_on_reclaim(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job_id = submit(sessions, alice)
    claim(sessions, job_id, "cpu0@host")
    with transaction(sessions) as session:
        [outcome] = reclaim_claims_of(session, ["cpu0@host"], max_attempts=1)
    assert outcome.state == JobState.FAILED
    assert books(sessions, alice) == 10_000  # its hold released, nothing captured


def test_heartbeats_lapse_on_redis_clock_and_a_clean_stop_is_not_a_lapse(
    redis_client: redis.Redis,  # noqa: F811
) -> None:
    record_heartbeat(redis_client, "crashed", {"device": "cpu"}, ttl_s=0.2)
    record_heartbeat(redis_client, "stopped", {"device": "cpu"}, ttl_s=0.2)
    record_heartbeat(redis_client, "beating", {"device": "cpu"}, ttl_s=60)
    assert set(live_workers(redis_client)) == {"crashed", "stopped", "beating"}
    assert lapsed_workers(redis_client) == set()
    forget_worker(redis_client, "stopped")  # what a worker does when it stops cleanly
    time.sleep(0.4)
    assert set(live_workers(redis_client)) == {"beating"}
    assert lapsed_workers(redis_client) == {"crashed"}


def test_the_dispatcher_requeues_the_jobs_of_a_worker_whose_heartbeat_lapsed(
    settings: Settings,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    redis_client: redis.Redis,  # noqa: F811
    celery_app: Celery,  # noqa: F811
) -> None:
    lost, kept = submit(sessions, alice), submit(sessions, alice)
    dispatcher = make_dispatcher(settings, sessions, redis_client, celery_app)
    assert sorted(dispatcher.run_pass().released) == sorted([lost, kept])
    claim(sessions, lost, "cut-off")
    claim(sessions, kept, "alive")
    record_heartbeat(redis_client, "cut-off", {}, ttl_s=0.2)
    record_heartbeat(redis_client, "alive", {}, ttl_s=60)
    time.sleep(0.4)
    # Its lease still has minutes to run: only the lapsed heartbeat gives it back.
    assert load_job(sessions, lost).lease_expires_at is not None
    report = dispatcher.run_pass()
    assert report.requeued == [lost]
    assert lost in report.released  # back in line, and released again at once
    assert load_job(sessions, kept).state == JobState.RUNNING.value
