"""Queue positions and release decisions from the users' lines, against the full fair order.

Random histories of submissions, releases, claims, finishes, cancels (from any
place in a line), lapsed leases and lost messages, over users in tenants of one
to four users with random weights, run through the real transitions on SQLite
and PostgreSQL. After every few steps, each waiting job's `queue_place` must be
its exact place in `fair_order` over the whole queue read row by row, and the
release decision must pick what `pick_for_release` picks from that order.
"""

from __future__ import annotations

import random
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.accounts.users import Principal, create_user, set_tenant_weight, set_user_weight
from shared.db import make_engine, make_session_factory, read_only, transaction
from shared.jobs.params import KolorsParams
from shared.jobs.transitions import (
    cancel_job,
    claim_job,
    finish_job,
    recover_expired_leases,
    release_next_jobs,
    submit_job,
    unrelease_job,
)
from shared.models import Job, JobState, UserQueue, utcnow
from shared.scheduling.fairshare import fair_order, pick_for_release
from shared.scheduling.order import next_in_fair_order
from shared.scheduling.positions import queue_place
from tests.conftest import empty_database, exact_queue, make_job, make_user, release_job

LEASE = timedelta(minutes=5)
# Tenants of 1 to 4 users: ties inside a tenant of many users need the tie-break reads.
TENANT_SIZES = (1, 2, 3, 4)


def make_users(sessions: sessionmaker[Session], rng: random.Random) -> list[Principal]:
    principals = []
    with transaction(sessions) as session:
        for t, size in enumerate(TENANT_SIZES):
            for u in range(size):
                user, _key = create_user(session, f"u{t}-{u}", f"t{t}", 10**9)
                principals.append(Principal(user.id, user.tenant_id, user.name))
                set_user_weight(session, user.name, rng.randint(1, 3))
            set_tenant_weight(session, f"t{t}", rng.randint(1, 3))
    return principals


def check_against_the_full_order(session: Session) -> int:
    """Every waiting job's place and the release decisions; returns how many were checked."""
    waiting, state = exact_queue(session)
    released = session.execute(
        select(Job.id).where(Job.state == "QUEUED", Job.released_at.is_not(None))
    ).all()
    order = fair_order(waiting, state)
    for position, queued in enumerate(order):
        place = queue_place(session, session.get_one(Job, queued.job_id))
        assert place.position == len(released) + position, (queued, position)
    for slots in (1, 5):
        for cap in (0, 2):
            expected = pick_for_release(order, slots, state, cap)
            assert [q.job_id for q in next_in_fair_order(session, slots, cap)] == [
                q.job_id for q in expected
            ], (slots, cap)
    return len(order)


@pytest.mark.parametrize("seed", [1, 2])
def test_positions_and_decisions_follow_the_full_fair_order(
    sessions: sessionmaker[Session], seed: int
) -> None:
    rng = random.Random(seed)
    principals = make_users(sessions, rng)
    params = KolorsParams(prompt="x", width=512, height=512, steps=2)
    running: list[tuple[str, int]] = []
    checked = 0
    for step in range(240):
        action = rng.choices(
            ["submit", "release", "claim", "finish", "cancel", "expire", "unrelease"],
            weights=[12, 3, 3, 3, 2, 1, 1],
        )[0]
        with transaction(sessions) as session:
            if action == "submit":
                principal = rng.choice(principals)
                submit_job(session, principal, params, Decimal(1))
            elif action == "release":
                release_next_jobs(session, rng.randint(1, 4), rng.choice([0, 0, 2]))
            elif action == "claim":
                released = session.scalars(
                    select(Job.id).where(Job.state == "QUEUED", Job.released_at.is_not(None))
                ).all()
                if released:
                    spec = claim_job(session, rng.choice(released), "w", LEASE)
                    assert spec is not None
                    running.append((spec.job_id, spec.attempt))
            elif action == "finish" and running:
                job_id, attempt = running.pop(rng.randrange(len(running)))
                job = session.get_one(Job, job_id)
                if job.state == JobState.RUNNING.value and job.attempt == attempt:
                    finish_job(session, job_id, attempt)
            elif action == "cancel":
                waiting = session.scalars(
                    select(Job).where(Job.state == "QUEUED", Job.released_at.is_(None))
                ).all()
                if waiting:  # any place in a line: the middle moves the shorter side
                    job = rng.choice(waiting)
                    owner = next(p for p in principals if p.user_id == job.user_id)
                    cancel_job(session, owner, job.id)
            elif action == "expire" and running:
                job_id, _attempt = rng.choice(running)
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
                    .values(lease_expires_at=utcnow() - timedelta(seconds=1))
                )
            elif action == "unrelease":
                released = session.scalars(
                    select(Job.id).where(Job.state == "QUEUED", Job.released_at.is_not(None))
                ).all()
                if released:
                    unrelease_job(session, rng.choice(released))
        if action == "expire":
            with transaction(sessions) as session:
                recover_expired_leases(session, max_attempts=99)
        if step % 12 == 11:
            with read_only(sessions) as session:
                checked += check_against_the_full_order(session)
    assert checked > 60  # the histories kept real queues to check


def test_a_line_stays_numbered_when_jobs_leave_from_the_middle(
    sessions: sessionmaker[Session],
) -> None:
    with transaction(sessions) as session:
        user, _key = create_user(session, "solo", "solo", 10**9)
        principal = Principal(user.id, user.tenant_id, user.name)
    params = KolorsParams(prompt="x", width=512, height=512, steps=2)
    ids = []
    for _ in range(9):
        with transaction(sessions) as session:
            ids.append(submit_job(session, principal, params, Decimal(1)).id)
    # Cancel the 2nd (the front moves), the 8th (the back moves) and the middle one.
    for job_id in (ids[1], ids[7], ids[4]):
        with transaction(sessions) as session:
            cancel_job(session, principal, job_id)
    kept = [ids[i] for i in (0, 2, 3, 5, 6, 8)]
    with read_only(sessions) as session:
        line = session.get_one(UserQueue, user.id)
        seqs = [session.get_one(Job, job_id).queue_seq for job_id in kept]
        assert seqs == list(range(line.head_seq, line.head_seq + 6))
        assert (line.waiting, line.head_job_id, line.tail_job_id) == (6, ids[0], ids[8])
        places = [queue_place(session, session.get_one(Job, job_id)).position for job_id in kept]
    assert places == [0, 1, 2, 3, 4, 5]


def test_a_job_released_after_its_row_was_read_is_placed_among_the_released(
    postgres_database: str,
) -> None:
    # PostgreSQL's READ COMMITTED: a status read sees the job waiting, then the dispatcher
    # releases it, then the read's next statement sees the line without it.
    engine = make_engine(empty_database(postgres_database))
    sessions = make_session_factory(engine)
    try:
        alice = make_user(sessions, "alice", 10_000)
        make_job(sessions, alice, release=True)
        job = make_job(sessions, alice)
        with transaction(sessions) as reader:
            read = reader.get_one(Job, job.id)
            assert read.released_at is None
            with transaction(sessions) as dispatcher:
                release_job(dispatcher, job.id)
            place = queue_place(reader, read)
        assert place.position == 1  # after the job released first
        assert read.released_at is not None
    finally:
        engine.dispose()
