"""The scheduler's database side (shared/dispatch.py) and the Dispatcher, on real parts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from control.dispatcher import Dispatcher
from shared.accounts.ledger import get_balance, ledger_balance
from shared.celery_app import RENDER_QUEUE, make_celery
from shared.db import transaction
from shared.errors import StaleAttempt, TooManyJobs
from shared.jobs.params import KolorsParams
from shared.jobs.queries import stale_releases
from shared.jobs.transitions import (
    DEADLINE_ERROR,
    cancel_job,
    claim_job,
    enforce_deadlines,
    record_image,
    recover_expired_leases,
    release_next_jobs,
    renew_lease,
    touch_release,
)
from shared.models import Job, JobState, LedgerEntry, LedgerKind, utcnow
from shared.redis_client import make_redis
from shared.scheduling.fleet import count_settling, record_heartbeat
from shared.scheduling.order import Load, current_load
from shared.scheduling.positions import queue_place
from shared.settings import Settings
from tests.conftest import ApiUser, make_job, make_user, release_job, resources_for

ONE = Decimal("1")
LEASE = timedelta(minutes=5)
DAY = timedelta(days=1)
# A 512x512, 25-step image: 250 millicredits, 6.25 work units (1024x1024 x 1 step).
SMALL_PRICE = 250
SMALL_WORK = 512 * 512 * 25 / (1024 * 1024)


def params(images: int = 1, steps: int = 25) -> KolorsParams:
    return KolorsParams(prompt="a cat", width=512, height=512, steps=steps, number_of_images=images)


def submit(
    sessions: sessionmaker[Session],
    user: ApiUser,
    images: int = 1,
    *,
    steps: int = 25,
    deadline: timedelta = DAY,
) -> str:
    job = make_job(
        sessions, user, params(images, steps), price=ONE, max_live_jobs=100, deadline=deadline
    )
    return job.id


def load_job(sessions: sessionmaker[Session], job_id: str) -> Job:
    with transaction(sessions) as session:
        return session.get_one(Job, job_id)


def set_job(sessions: sessionmaker[Session], job_id: str, **values: Any) -> None:
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def claim(sessions: sessionmaker[Session], job_id: str, worker: str = "w1") -> int:
    with transaction(sessions) as session:
        spec = claim_job(session, release_job(session, job_id), worker, LEASE)
    assert spec is not None
    return spec.attempt


def expire_lease(sessions: sessionmaker[Session], job_id: str) -> None:
    set_job(sessions, job_id, lease_expires_at=utcnow() - timedelta(minutes=1))


def release(sessions: sessionmaker[Session], slots: int, cap: int = 0) -> list[str]:
    with transaction(sessions) as session:
        return release_next_jobs(session, slots, cap)


def kinds(sessions: sessionmaker[Session], job_id: str) -> list[str]:
    with transaction(sessions) as session:
        return list(
            session.execute(
                select(LedgerEntry.kind)
                .where(LedgerEntry.job_id == job_id)
                .order_by(LedgerEntry.id)
            ).scalars()
        )


def books(sessions: sessionmaker[Session], user: ApiUser) -> int:
    """The user's balance, after checking the ledger agrees with it."""
    with transaction(sessions) as session:
        balance = get_balance(session, user.principal.user_id)
        assert ledger_balance(session, user.principal.user_id) == balance
        return balance


def deliver(sessions: sessionmaker[Session], job_id: str, attempt: int, index: int = 0) -> None:
    with transaction(sessions) as session:
        record_image(
            session,
            job_id,
            attempt,
            index,
            seed=index,
            storage_key=f"k/{job_id}/{index}",
            content_type="image/webp",
            size_bytes=1,
        )


@pytest.fixture
def bob(sessions: sessionmaker[Session]) -> ApiUser:
    return make_user(sessions, "bob", 10_000)


# ---------------------------------------------------------------- release


def test_release_follows_fair_order_and_respects_slots(
    sessions: sessionmaker[Session], alice: ApiUser, bob: ApiUser
) -> None:
    a = [submit(sessions, alice) for _ in range(4)]
    b = [submit(sessions, bob) for _ in range(2)]
    before = utcnow()
    first = release(sessions, 3)
    assert first == [a[0], b[0], a[1]]
    for job_id in first:
        released_at = load_job(sessions, job_id).released_at
        assert released_at is not None and released_at >= before - timedelta(seconds=1)
    for job_id in [a[2], a[3], b[1]]:
        assert load_job(sessions, job_id).released_at is None
    # Alice has two in flight, Bob one: Bob's next job goes first.
    assert release(sessions, 1) == [b[1]]
    assert release(sessions, 10) == [a[2], a[3]]
    assert release(sessions, 10) == []
    for job_id in a + b:
        job = load_job(sessions, job_id)
        assert job.state == JobState.QUEUED.value and job.released_at is not None


def test_release_with_no_slots_releases_nothing(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job_id = submit(sessions, alice)
    assert release(sessions, 0) == []
    assert release(sessions, -3) == []
    assert load_job(sessions, job_id).released_at is None


def test_release_never_releases_a_cancelled_job(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    ids = [submit(sessions, alice) for _ in range(3)]
    with transaction(sessions) as session:
        cancel_job(session, alice.principal, ids[0])
    assert release(sessions, 5) == ids[1:]
    job = load_job(sessions, ids[0])
    assert job.state == JobState.CANCELLED.value and job.released_at is None


def test_release_applies_the_per_user_cap(
    sessions: sessionmaker[Session], alice: ApiUser, bob: ApiUser
) -> None:
    a = [submit(sessions, alice) for _ in range(3)]
    b = [submit(sessions, bob) for _ in range(3)]
    assert release(sessions, 10, cap=1) == [a[0], b[0]]
    claim(sessions, a[0])  # running still counts against the cap
    assert release(sessions, 10, cap=1) == []
    assert release(sessions, 10, cap=2) == [a[1], b[1]]


def test_current_load_counts_running_and_released(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    with transaction(sessions) as session:
        assert current_load(session) == Load(running=0, released=0)
    ids = [submit(sessions, alice) for _ in range(5)]
    with transaction(sessions) as session:
        assert current_load(session) == Load(running=0, released=0)
    assert release(sessions, 3) == ids[:3]
    claim(sessions, ids[0])
    # A claimed job that was never released (a redelivered message) is running too.
    claim(sessions, ids[4])
    with transaction(sessions) as session:
        cancel_job(session, alice.principal, ids[2])  # released, then cancelled: not in flight
    with transaction(sessions) as session:
        assert current_load(session) == Load(running=2, released=1)


# ---------------------------------------------------------------- leases


def test_expired_lease_is_requeued_and_the_next_claim_is_attempt_two(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job_id = submit(sessions, alice)
    other = submit(sessions, alice)
    assert release(sessions, 2) == [job_id, other]
    assert claim(sessions, job_id) == 1
    assert claim(sessions, other, "w2") == 1
    with transaction(sessions) as session:
        assert recover_expired_leases(session, 3) == []  # leases still valid
    expire_lease(sessions, job_id)
    with transaction(sessions) as session:
        outcomes = recover_expired_leases(session, 3)
    assert [(o.job_id, o.requeued, o.attempt) for o in outcomes] == [(job_id, True, 1)]
    job = load_job(sessions, job_id)
    assert job.state == JobState.QUEUED.value
    assert job.released_at is None
    assert job.worker is None and job.lease_expires_at is None
    assert job.attempt == 1
    assert load_job(sessions, other).state == JobState.RUNNING.value
    # Requeued jobs wait in line again and are released like any other.
    assert release(sessions, 1) == [job_id]
    assert claim(sessions, job_id, "w3") == 2
    assert load_job(sessions, job_id).worker == "w3"
    with transaction(sessions) as session:
        assert recover_expired_leases(session, 3) == []
    assert kinds(sessions, job_id) == [LedgerKind.HOLD.value]


def test_lease_out_of_attempts_fails_the_job_and_releases_once(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job_id = submit(sessions, alice, images=2)
    assert books(sessions, alice) == 10_000 - 2 * SMALL_PRICE
    for attempt in (1, 2):
        assert claim(sessions, job_id) == attempt
        expire_lease(sessions, job_id)
        with transaction(sessions) as session:
            outcomes = recover_expired_leases(session, 2)
        if attempt == 1:
            assert [(o.requeued, o.attempt) for o in outcomes] == [(True, 1)]
    assert [(o.job_id, o.requeued, o.attempt) for o in outcomes] == [(job_id, False, 2)]
    job = load_job(sessions, job_id)
    assert job.state == JobState.FAILED.value
    assert job.error is not None and "lost 2 times" in job.error
    assert job.lease_expires_at is None and job.finished_at is not None
    with transaction(sessions) as session:
        assert recover_expired_leases(session, 2) == []
    assert kinds(sessions, job_id) == [LedgerKind.HOLD.value, LedgerKind.RELEASE.value]
    assert books(sessions, alice) == 10_000


def test_failed_after_delivering_charges_only_the_delivered_image(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job_id = submit(sessions, alice, images=3)
    attempt = claim(sessions, job_id)
    deliver(sessions, job_id, attempt, 0)
    expire_lease(sessions, job_id)
    with transaction(sessions) as session:
        assert [o.requeued for o in recover_expired_leases(session, 1)] == [False]
    assert kinds(sessions, job_id) == ["hold", "capture", "release"]
    assert books(sessions, alice) == 10_000 - SMALL_PRICE


def test_stale_attempt_cannot_record_after_requeue(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job_id = submit(sessions, alice, images=2)
    assert claim(sessions, job_id) == 1
    expire_lease(sessions, job_id)
    with transaction(sessions) as session:
        assert recover_expired_leases(session, 3)[0].requeued
    with pytest.raises(StaleAttempt):
        deliver(sessions, job_id, 1, 0)
    assert claim(sessions, job_id, "w2") == 2
    with pytest.raises(StaleAttempt):
        deliver(sessions, job_id, 1, 0)
    deliver(sessions, job_id, 2, 0)
    job = load_job(sessions, job_id)
    assert job.images_done == 1
    assert kinds(sessions, job_id) == ["hold", "capture"]


def test_renew_lease_is_refused_to_a_stale_attempt(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job_id = submit(sessions, alice)
    assert claim(sessions, job_id) == 1
    expire_lease(sessions, job_id)
    with transaction(sessions) as session:
        recover_expired_leases(session, 3)
    with transaction(sessions) as session:
        assert renew_lease(session, job_id, 1, LEASE) is False  # requeued: nobody holds it
    assert claim(sessions, job_id, "w2") == 2
    with transaction(sessions) as session:
        assert renew_lease(session, job_id, 1, LEASE) is False
    assert load_job(sessions, job_id).worker == "w2"
    set_job(sessions, job_id, lease_expires_at=utcnow() + timedelta(seconds=5))
    with transaction(sessions) as session:
        assert renew_lease(session, job_id, 2, timedelta(hours=1)) is True
    lease = load_job(sessions, job_id).lease_expires_at
    assert lease is not None and lease > utcnow() + timedelta(minutes=59)


def test_cancelled_running_job_whose_worker_died_is_settled(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job_id = submit(sessions, alice, images=2)
    assert release(sessions, 1) == [job_id]
    assert claim(sessions, job_id) == 1
    with transaction(sessions) as session:
        assert cancel_job(session, alice.principal, job_id).cancel_requested is True
    expire_lease(sessions, job_id)  # the worker died before it saw the cancel
    with transaction(sessions) as session:
        recover_expired_leases(session, 3)
    # Everything a dispatcher pass would do next, twice over.
    for _ in range(2):
        with transaction(sessions) as session:
            enforce_deadlines(session)
            recover_expired_leases(session, 3)
        assert release(sessions, 10) == []  # it is never released...
        with transaction(sessions) as session:
            assert (
                claim_job(session, release_job(session, job_id), "w2", LEASE) is None
            )  # ...nor claimable
    # So the job must already have ended, and its hold must be back.
    job = load_job(sessions, job_id)
    assert job.state == JobState.CANCELLED.value, job.state
    assert kinds(sessions, job_id) == ["hold", "release"]
    assert books(sessions, alice) == 10_000


# ---------------------------------------------------------------- deadlines


def test_deadlines_cancel_queued_and_flag_running_jobs_only(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    queued_late = submit(sessions, alice)
    released_late = submit(sessions, alice)
    running_late = submit(sessions, alice)
    queued_ok = submit(sessions, alice)
    running_ok = submit(sessions, alice)
    queued_no_deadline = submit(sessions, alice)
    set_job(sessions, queued_no_deadline, deadline_at=None)
    set_job(sessions, released_late, released_at=utcnow())
    claim(sessions, running_late)
    claim(sessions, running_ok)
    past = utcnow() - timedelta(seconds=1)
    for job_id in (queued_late, released_late, running_late):
        set_job(sessions, job_id, deadline_at=past)
    balance_before = books(sessions, alice)

    with transaction(sessions) as session:
        outcome = enforce_deadlines(session)
    assert sorted(outcome.cancelled) == sorted([queued_late, released_late])
    assert outcome.running == [running_late]

    for job_id in (queued_late, released_late):
        job = load_job(sessions, job_id)
        assert job.state == JobState.CANCELLED.value
        assert job.error == DEADLINE_ERROR and job.finished_at is not None
        assert kinds(sessions, job_id) == ["hold", "release"]
    late = load_job(sessions, running_late)
    assert late.state == JobState.RUNNING.value
    assert late.cancel_requested is True and late.error == DEADLINE_ERROR
    assert kinds(sessions, running_late) == ["hold"]
    for job_id in (queued_ok, running_ok, queued_no_deadline):
        job = load_job(sessions, job_id)
        assert job.cancel_requested is False and job.error is None
        assert kinds(sessions, job_id) == ["hold"]
    assert load_job(sessions, queued_ok).state == JobState.QUEUED.value
    assert load_job(sessions, running_ok).state == JobState.RUNNING.value
    assert books(sessions, alice) == balance_before + 2 * SMALL_PRICE

    with transaction(sessions) as session:
        again = enforce_deadlines(session)
    assert again.cancelled == [] and again.running == []
    assert kinds(sessions, queued_late) == ["hold", "release"]


# ---------------------------------------------------------------- stale releases


def test_stale_releases_and_touch_release(sessions: sessionmaker[Session], alice: ApiUser) -> None:
    ids = [submit(sessions, alice) for _ in range(5)]
    assert release(sessions, 4) == ids[:4]
    now = utcnow()
    set_job(sessions, ids[0], released_at=now - timedelta(minutes=5))
    set_job(sessions, ids[1], released_at=now - timedelta(minutes=10))
    set_job(sessions, ids[2], released_at=now - timedelta(minutes=7))
    set_job(sessions, ids[3], released_at=now - timedelta(minutes=20))
    claim(sessions, ids[3])  # claimed: its release is no longer pending
    cutoff = now - timedelta(minutes=1)
    with transaction(sessions) as session:
        assert stale_releases(session, cutoff, 10) == [ids[1], ids[2], ids[0]]
        assert stale_releases(session, cutoff, 2) == [ids[1], ids[2]]
        assert stale_releases(session, cutoff, 0) == []
        assert stale_releases(session, now - timedelta(minutes=8), 10) == [ids[1]]
    with transaction(sessions) as session:
        touch_release(session, ids[1])
        touch_release(session, ids[3])  # running: left alone
    touched = load_job(sessions, ids[1]).released_at
    assert touched is not None and touched >= now - timedelta(seconds=1)
    running_release = load_job(sessions, ids[3]).released_at
    assert running_release is not None and running_release < cutoff
    with transaction(sessions) as session:
        assert stale_releases(session, cutoff, 10) == [ids[2], ids[0]]


# ---------------------------------------------------------------- queue place


def test_queue_place_puts_released_jobs_first_then_the_fair_order(
    sessions: sessionmaker[Session], alice: ApiUser, bob: ApiUser
) -> None:
    a0 = submit(sessions, alice, images=2)  # 12.5 work units
    a1 = submit(sessions, alice)
    a2 = submit(sessions, alice)
    b0 = submit(sessions, bob, steps=10)  # 2.5 work units
    b1 = submit(sessions, bob)
    assert release(sessions, 2) == [a0, b0]
    now = utcnow()
    set_job(sessions, a0, released_at=now - timedelta(seconds=10))
    set_job(sessions, b0, released_at=now - timedelta(seconds=5))
    b0_work = 512 * 512 * 10 / (1024 * 1024)

    def place(job_id: str) -> tuple[int, float]:
        with transaction(sessions) as session:
            found = queue_place(session, session.get_one(Job, job_id))
            return found.position, found.work_ahead

    assert place(a0) == (0, 0.0)
    assert place(b0) == (1, 2 * SMALL_WORK)
    # Unreleased: both released jobs, then alice (in flight 1) and bob (1) alternate.
    assert place(a1) == (2, 2 * SMALL_WORK + b0_work)
    assert place(b1) == (3, 3 * SMALL_WORK + b0_work)
    assert place(a2) == (4, 4 * SMALL_WORK + b0_work)
    # Cancelling a job ahead moves the others up.
    with transaction(sessions) as session:
        cancel_job(session, alice.principal, a1)
    # a2 is now Alice's next job and older than b1: it wins their tie.
    assert place(a2) == (2, 2 * SMALL_WORK + b0_work)
    assert place(b1) == (3, 3 * SMALL_WORK + b0_work)


# ---------------------------------------------------------------- submission cap


def test_too_many_live_jobs_leaves_nothing_behind(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    kept = []
    for _ in range(2):
        job = make_job(sessions, alice, params(), price=ONE, max_live_jobs=2, deadline=DAY)
        kept.append(job.id)
    with pytest.raises(TooManyJobs) as caught:
        make_job(sessions, alice, params(), price=ONE, max_live_jobs=2, deadline=DAY)
    assert caught.value.retry_after_s == 10
    with transaction(sessions) as session:
        assert sorted(session.execute(select(Job.id)).scalars()) == sorted(kept)
        holds = session.execute(
            select(LedgerEntry.job_id).where(LedgerEntry.kind == LedgerKind.HOLD.value)
        ).scalars()
        assert sorted(h for h in holds if h is not None) == sorted(kept)
        assert session.scalar(select(func.count()).select_from(LedgerEntry)) == 3  # grant + 2
    assert books(sessions, alice) == 10_000 - 2 * SMALL_PRICE
    # A finished (here: cancelled) job no longer counts: a third one is accepted.
    with transaction(sessions) as session:
        cancel_job(session, alice.principal, kept[0])
    make_job(sessions, alice, params(), price=ONE, max_live_jobs=2, deadline=DAY)


# ---------------------------------------------------------------- the Dispatcher on Redis


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    client = make_redis(settings.require_redis_url())
    yield client
    client.close()


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


def make_dispatcher(
    settings: Settings,
    sessions: sessionmaker[Session],
    client: redis.Redis,
    celery: Celery,
    **overrides: Any,
) -> Dispatcher:
    tuned = settings.model_copy(update={"dispatch_margin": 2, **overrides})
    return Dispatcher(resources_for(tuned, sessions), celery)


def released_ids(sessions: sessionmaker[Session]) -> list[str]:
    with transaction(sessions) as session:
        return list(session.execute(select(Job.id).where(Job.released_at.is_not(None))).scalars())


def test_dispatcher_releases_into_free_slots_only(
    settings: Settings,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    redis_client: redis.Redis,
    celery_app: Celery,
) -> None:
    ids = [submit(sessions, alice) for _ in range(5)]
    dispatcher = make_dispatcher(settings, sessions, redis_client, celery_app)
    report = dispatcher.run_pass()
    assert report.released == ids[:2]
    assert sorted(released_ids(sessions)) == sorted(ids[:2])
    assert redis_client.llen(RENDER_QUEUE) == 2
    assert report.republished == [] and report.requeued == [] and report.failed == []

    again = dispatcher.run_pass()
    assert again.released == [] and again.republished == []
    assert redis_client.llen(RENDER_QUEUE) == 2

    # A worker coming alive opens one more slot.
    record_heartbeat(redis_client, "gpu-1", {"device": "cuda:0"}, 30)
    third = dispatcher.run_pass()
    assert third.released == [ids[2]]
    assert redis_client.llen(RENDER_QUEUE) == 3


def test_a_job_that_is_only_settling_leaves_its_workers_slot_free(
    settings: Settings,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    redis_client: redis.Redis,
    celery_app: Celery,
) -> None:
    ids = [submit(sessions, alice) for _ in range(4)]
    record_heartbeat(redis_client, "gpu-1", {"device": "cuda:0"}, 30)
    dispatcher = make_dispatcher(settings, sessions, redis_client, celery_app, dispatch_margin=0)
    assert dispatcher.run_pass().released == ids[:1]
    claim(sessions, ids[0], "gpu-1")
    assert dispatcher.run_pass().released == []  # its one slot renders ids[0]
    # The render ends; its images are still being stored and recorded (RUNNING in SQL).
    count_settling(redis_client, "gpu-1", 1)
    assert dispatcher.run_pass().released == [ids[1]]
    assert dispatcher.run_pass().released == []
    # A settling count of a worker that is not alive frees nothing.
    count_settling(redis_client, "gone", 5)
    assert dispatcher.run_pass().released == []


def test_dispatcher_republishes_lost_messages(
    settings: Settings,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    redis_client: redis.Redis,
    celery_app: Celery,
) -> None:
    ids = [submit(sessions, alice) for _ in range(5)]
    dispatcher = make_dispatcher(
        settings, sessions, redis_client, celery_app, redispatch_after_s=0.001
    )
    assert dispatcher.run_pass().released == ids[:2]
    assert redis_client.llen(RENDER_QUEUE) == 2
    redis_client.delete(RENDER_QUEUE)  # the broker lost the messages
    time.sleep(0.05)
    before = utcnow()
    report = dispatcher.run_pass()
    assert sorted(report.republished) == sorted(ids[:2])
    assert report.released == []
    assert redis_client.llen(RENDER_QUEUE) == 2
    for job_id in ids[:2]:
        touched = load_job(sessions, job_id).released_at
        assert touched is not None and touched >= before - timedelta(seconds=1)
    # Nothing is lost any more: nothing is published again.
    time.sleep(0.05)
    assert dispatcher.run_pass().republished == []
    assert redis_client.llen(RENDER_QUEUE) == 2


def test_dispatcher_waits_before_republishing(
    settings: Settings,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    redis_client: redis.Redis,
    celery_app: Celery,
) -> None:
    ids = [submit(sessions, alice) for _ in range(3)]
    dispatcher = make_dispatcher(settings, sessions, redis_client, celery_app)
    assert dispatcher.run_pass().released == ids[:2]
    redis_client.delete(RENDER_QUEUE)
    # redispatch_after_s is 30 s by default: a fresh release is not yet taken for lost.
    assert dispatcher.run_pass().republished == []
    assert redis_client.llen(RENDER_QUEUE) == 0


def test_dispatcher_requeues_expired_leases(
    settings: Settings,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    redis_client: redis.Redis,
    celery_app: Celery,
) -> None:
    ids = [submit(sessions, alice) for _ in range(3)]
    dispatcher = make_dispatcher(settings, sessions, redis_client, celery_app, max_attempts=3)
    assert dispatcher.run_pass().released == ids[:2]
    claim(sessions, ids[0])
    expire_lease(sessions, ids[0])
    report = dispatcher.run_pass()
    assert report.requeued == [ids[0]]
    assert report.failed == []
    # Requeued, it is released again (fair order: oldest first) into the freed slot.
    assert report.released == [ids[0]]
    job = load_job(sessions, ids[0])
    assert job.state == JobState.QUEUED.value and job.attempt == 1


def test_dispatcher_fails_jobs_out_of_attempts(
    settings: Settings,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    redis_client: redis.Redis,
    celery_app: Celery,
) -> None:
    job_id = submit(sessions, alice)
    dispatcher = make_dispatcher(settings, sessions, redis_client, celery_app, max_attempts=1)
    assert dispatcher.run_pass().released == [job_id]
    claim(sessions, job_id)
    expire_lease(sessions, job_id)
    report = dispatcher.run_pass()
    assert report.failed == [job_id] and report.requeued == []
    assert load_job(sessions, job_id).state == JobState.FAILED.value
    assert books(sessions, alice) == 10_000


def test_dispatcher_cancels_jobs_past_their_deadline(
    settings: Settings,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    redis_client: redis.Redis,
    celery_app: Celery,
) -> None:
    late = submit(sessions, alice)
    on_time = submit(sessions, alice)
    set_job(sessions, late, deadline_at=utcnow() - timedelta(seconds=1))
    dispatcher = make_dispatcher(settings, sessions, redis_client, celery_app)
    report = dispatcher.run_pass()
    assert report.expired == [late]
    assert report.released == [on_time]
    assert load_job(sessions, late).state == JobState.CANCELLED.value
