"""After-commit effects: recorded by transitions, published once after the commit, one policy."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from decimal import Decimal

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.jobs.effects import (
    CancelRequested,
    ImageDelivered,
    JobEnded,
    JobStarted,
    JobSubmitted,
    install_publisher,
    pending_effects,
)
from shared.jobs.events import cancel_key, event_log_key, job_channel
from shared.jobs.params import KolorsParams
from shared.jobs.transitions import cancel_job, claim_job, fail_job, record_image, submit_job
from shared.metrics.counters import FINISHED_KEY, IMAGES_KEY, QUEUE_WAIT_KEY, SUBMITTED_KEY
from shared.models import Job, JobState
from shared.redis_client import make_redis
from shared.scheduling.fleet import DISPATCH_WAKE_KEY
from shared.settings import Settings
from tests.conftest import ApiUser, make_user, release_job, resources_for

PRICE = Decimal("1")
LEASE = timedelta(seconds=60)


def _submit(sessions: sessionmaker[Session], user: ApiUser, **fields: object) -> str:
    with transaction(sessions) as session:
        job = submit_job(session, user.principal, KolorsParams(prompt="a fox", **fields), PRICE)
        return job.id


@pytest.fixture
def client(settings: Settings, sessions: sessionmaker[Session]) -> redis.Redis:
    """The test's Redis, with the sessions' publisher installed as every process does."""
    resources = resources_for(settings, sessions)
    return resources.redis


def test_a_submission_is_counted_and_wakes_the_dispatcher_only_after_its_commit(
    client: redis.Redis, sessions: sessionmaker[Session]
) -> None:
    user = make_user(sessions, "ann", 10_000)
    with transaction(sessions) as session:
        submit_job(session, user.principal, KolorsParams(prompt="a fox"), PRICE)
        assert pending_effects(session) == [JobSubmitted(user.principal.tenant_id)]
        # Inside the transaction nothing has been sent yet.
        assert client.hget(SUBMITTED_KEY, str(user.principal.tenant_id)) is None
        assert client.llen(DISPATCH_WAKE_KEY) == 0
    assert client.hget(SUBMITTED_KEY, str(user.principal.tenant_id)) == b"1"
    assert client.llen(DISPATCH_WAKE_KEY) == 1


def test_a_rolled_back_transition_publishes_nothing(
    client: redis.Redis, sessions: sessionmaker[Session]
) -> None:
    user = make_user(sessions, "ann", 10_000)

    def fail_after_the_transition() -> None:
        with transaction(sessions) as session:
            submit_job(session, user.principal, KolorsParams(prompt="a fox"), PRICE)
            raise RuntimeError("the caller failed after the transition")

    with pytest.raises(RuntimeError):
        fail_after_the_transition()
    with transaction(sessions) as session:
        assert pending_effects(session) == []
    assert client.hget(SUBMITTED_KEY, str(user.principal.tenant_id)) is None
    assert client.llen(DISPATCH_WAKE_KEY) == 0


def test_a_job_from_claim_to_end_records_each_effect_once(
    client: redis.Redis, sessions: sessionmaker[Session]
) -> None:
    user = make_user(sessions, "ann", 10_000)
    tenant = user.principal.tenant_id
    job_id = _submit(sessions, user, number_of_images=2)
    with transaction(sessions) as session:
        release_job(session, job_id)
    with transaction(sessions) as session:
        spec = claim_job(session, job_id, "w1", LEASE)
        assert spec is not None
        [started] = pending_effects(session)
        assert isinstance(started, JobStarted) and started.queue_wait_s is not None
    assert client.xlen(event_log_key(job_id)) == 1  # the RUNNING event of the stream
    assert client.hlen(QUEUE_WAIT_KEY) == 2  # one bucket and the sum
    price = spec_price(sessions, job_id)
    with transaction(sessions) as session:
        record_image(
            session, job_id, 1, 0, seed=1, storage_key="k0", content_type="x", size_bytes=1
        )
        assert pending_effects(session) == [ImageDelivered(tenant, price)]
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(job_channel(job_id))
    with transaction(sessions) as session:
        state = record_image(
            session,
            job_id,
            1,
            1,
            seed=2,
            storage_key="k1",
            content_type="x",
            size_bytes=1,
            finish=True,
        )
        assert state == JobState.COMPLETED
        effects = pending_effects(session)
        assert effects[-1] == JobEnded(job_id, tenant, "COMPLETED", freed_slot=True)
    messages = [pubsub.get_message(timeout=1) for _ in range(3)]  # the first: the subscription
    assert [m["data"] for m in messages if m is not None] == [b"COMPLETED"]
    assert client.hget(IMAGES_KEY, str(tenant)) == b"2"
    assert client.hget(FINISHED_KEY, f"{tenant}:COMPLETED") == b"1"


def spec_price(sessions: sessionmaker[Session], job_id: str) -> int:
    with transaction(sessions) as session:
        return session.get_one(Job, job_id).price_per_image


def test_cancels_record_a_flag_for_running_jobs_and_an_end_for_queued_ones(
    client: redis.Redis, sessions: sessionmaker[Session]
) -> None:
    user = make_user(sessions, "ann", 10_000)
    queued = _submit(sessions, user)
    running = _submit(sessions, user)
    with transaction(sessions) as session:
        release_job(session, running)
    with transaction(sessions) as session:
        assert claim_job(session, running, "w1", LEASE) is not None
    with transaction(sessions) as session:
        cancel_job(session, user.principal, running)
        assert pending_effects(session) == [CancelRequested(running)]
    assert client.exists(cancel_key(running)) == 1
    with transaction(sessions) as session:
        cancel_job(session, user.principal, queued)
        tenant = user.principal.tenant_id
        assert pending_effects(session) == [JobEnded(queued, tenant, "CANCELLED", freed_slot=False)]
    assert client.hget(FINISHED_KEY, f"{tenant}:CANCELLED") == b"1"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_redis_failure_after_the_commit_is_logged_and_the_commit_stands(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    dead = make_redis(f"redis://127.0.0.1:{_closed_port()}/0")
    install_publisher(sessions, dead)
    user = make_user(sessions, "ann", 10_000)
    job_id = _submit(sessions, user)
    caplog.set_level(logging.WARNING, logger="shared.jobs.effects")
    with transaction(sessions) as session:
        assert fail_job(session, job_id, "boom")  # no exception although Redis is away
    assert "after-commit effect(s) not published (ConnectionError)" in caplog.text
    with transaction(sessions) as session:
        assert session.get_one(Job, job_id).state == JobState.FAILED.value
