"""The database's clock decides leases and deadlines, whatever a host's own clock says.

A host whose clock is wrong is played by moving `shared.clock._host_now` (this
host's wall clock as `shared.clock` reads it); PostgreSQL's clock is unaffected.
Each wrong host gets an engine of its own, as a separate process would: the offset
is measured per engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

import shared.clock
from shared.clock import database_now
from shared.db import make_engine, make_session_factory, read_only, transaction
from shared.jobs.transitions import (
    claim_job,
    enforce_deadlines,
    recover_expired_leases,
    renew_lease,
)
from shared.models import Job, JobState
from shared.redis_client import make_redis
from shared.settings import Settings
from shared.storage import LocalStorage
from tests.conftest import ApiUser, make_job
from worker.context import WorkerContext
from worker.pipeline import KolorsRenderer
from worker.run import JobRun

LEASE = timedelta(seconds=60)
SKEW = timedelta(minutes=5)
# Clock readings taken a few statements apart; generous for a loaded machine.
TOLERANCE = timedelta(seconds=5)
ON_POSTGRES = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def server_time(sessions: sessionmaker[Session]) -> datetime:
    """PostgreSQL's own clock, read directly."""
    with read_only(sessions) as session:
        found: datetime = session.execute(text("SELECT clock_timestamp()")).scalar_one()
    return found.astimezone(UTC)


def near(moment: datetime, expected: datetime) -> bool:
    return abs(moment - expected) <= TOLERANCE


@pytest.fixture
def wrong_host(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Open sessions on a host whose clock is `skew` off, from a process of its own."""
    engines: list[Engine] = []
    real = shared.clock._host_now

    def host(skew: timedelta) -> sessionmaker[Session]:
        monkeypatch.setattr(shared.clock, "_host_now", lambda: real() + skew)
        engine = make_engine(database_url)
        engines.append(engine)
        return make_session_factory(engine)

    yield host
    for engine in engines:
        engine.dispose()


def right_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Back on a host whose clock is right (the `sessions` fixture's engine's host)."""
    monkeypatch.undo()


def statements(engine: Engine) -> list[str]:
    """The statements `engine` runs from now on, as they run."""
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    return seen


def lease_of(sessions: sessionmaker[Session], job_id: str) -> tuple[str, datetime | None]:
    with read_only(sessions) as session:
        row = session.execute(select(Job.state, Job.lease_expires_at).where(Job.id == job_id)).one()
    return row.state, row.lease_expires_at


# ---------------------------------------------------------------- the clock itself


def test_database_now_is_the_database_servers_time(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with read_only(sessions) as session:
        now = database_now(session)
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    if engine.dialect.name == "sqlite":
        # Embedded: the database's clock is this host's.
        assert near(now, datetime.now(UTC))
    else:
        assert near(now, server_time(sessions))


@ON_POSTGRES
@pytest.mark.parametrize("skew", [SKEW, -SKEW])
def test_a_wrong_host_clock_still_reads_the_servers_time(
    sessions: sessionmaker[Session], wrong_host: Any, skew: timedelta
) -> None:
    skewed = wrong_host(skew)
    with read_only(skewed) as session:
        assert not near(shared.clock._host_now(), server_time(sessions))  # the host is off
        assert near(database_now(session), server_time(sessions))


def test_sqlite_is_never_asked_the_time(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'clock.db'}")
    seen = statements(engine)
    with read_only(make_session_factory(engine)) as session:
        database_now(session)
        database_now(session)
    assert engine not in shared.clock._offsets
    engine.dispose()
    assert [s for s in seen if not s.startswith("BEGIN")] == []


@ON_POSTGRES
def test_the_offset_is_measured_once_then_again_when_stale(
    wrong_host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    skewed = wrong_host(timedelta(0))
    engine = skewed.kw["bind"]
    seen = statements(engine)
    for _ in range(3):
        with read_only(skewed) as session:
            database_now(session)
    assert [s for s in seen if "clock_timestamp" in s] == ["SELECT clock_timestamp()"]
    monkeypatch.setattr(shared.clock, "REMEASURE_AFTER_S", 0.0)
    with read_only(skewed) as session:
        database_now(session)
    assert len([s for s in seen if "clock_timestamp" in s]) == 2


@ON_POSTGRES
def test_a_failed_measurement_raises_and_caches_nothing(wrong_host: Any) -> None:
    skewed = wrong_host(SKEW)
    engine = skewed.kw["bind"]
    with skewed() as session:
        with pytest.raises(DBAPIError):
            session.connection().exec_driver_sql("SELECT 1/0")
        with pytest.raises(DBAPIError):  # the transaction is aborted: no answer
            database_now(session)
    assert engine not in shared.clock._offsets
    with read_only(skewed) as session:
        assert near(database_now(session), datetime.now(UTC))  # measured afresh, right
    assert engine in shared.clock._offsets


# ---------------------------------------------------------------- leases


@ON_POSTGRES
def test_a_slow_host_claims_with_a_lease_that_has_not_already_expired(
    sessions: sessionmaker[Session],
    alice: ApiUser,
    wrong_host: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = make_job(sessions, alice, release=True)
    slow = wrong_host(-SKEW)
    with transaction(slow) as session:
        spec = claim_job(session, job.id, "cuda0@slow", LEASE)
    assert spec is not None
    state, lease = lease_of(sessions, job.id)
    assert state == JobState.RUNNING.value and lease is not None
    assert near(lease, server_time(sessions) + LEASE)
    with transaction(slow) as session:  # a renewal, too, runs from the database's now
        assert renew_lease(session, job.id, spec.attempt, 2 * LEASE)
    renewed = lease_of(sessions, job.id)[1]
    assert renewed is not None and near(renewed, server_time(sessions) + 2 * LEASE)
    right_host(monkeypatch)
    with transaction(sessions) as session:
        assert recover_expired_leases(session, max_attempts=3) == []
    assert lease_of(sessions, job.id)[0] == JobState.RUNNING.value


@ON_POSTGRES
def test_a_fast_host_does_not_expire_another_workers_lease(
    sessions: sessionmaker[Session], alice: ApiUser, wrong_host: Any
) -> None:
    job = make_job(sessions, alice, release=True)
    with transaction(sessions) as session:
        assert claim_job(session, job.id, "cuda0@right", LEASE) is not None
    fast = wrong_host(SKEW)
    with transaction(fast) as session:
        assert recover_expired_leases(session, max_attempts=3) == []
    state, lease = lease_of(sessions, job.id)
    assert state == JobState.RUNNING.value and lease is not None
    assert near(lease, server_time(sessions) + LEASE)


@ON_POSTGRES
def test_a_lapsed_lease_is_still_recovered_by_a_wrong_host(
    sessions: sessionmaker[Session], alice: ApiUser, wrong_host: Any
) -> None:
    job = make_job(sessions, alice, release=True)
    with transaction(sessions) as session:
        assert claim_job(session, job.id, "cuda0@right", timedelta(seconds=-1)) is not None
    slow = wrong_host(-SKEW)  # would see the lease valid for 5 more minutes by its clock
    with transaction(slow) as session:
        [outcome] = recover_expired_leases(session, max_attempts=3)
    assert (outcome.job_id, outcome.state) == (job.id, JobState.QUEUED)


# ---------------------------------------------------------------- deadlines


@ON_POSTGRES
def test_deadlines_are_set_and_enforced_on_the_databases_clock(
    sessions: sessionmaker[Session],
    alice: ApiUser,
    wrong_host: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slow = wrong_host(-SKEW)
    queued = make_job(slow, alice, deadline=timedelta(minutes=2))
    running = make_job(slow, alice, release=True, deadline=timedelta(minutes=2))
    with transaction(slow) as session:
        assert claim_job(session, running.id, "cuda0@slow", LEASE) is not None
    for job in (queued, running):
        assert job.deadline_at is not None
        assert near(job.deadline_at, server_time(sessions) + timedelta(minutes=2))
    fast = wrong_host(SKEW)
    with transaction(fast) as session:
        outcome = enforce_deadlines(session)
    assert (outcome.cancelled, outcome.running) == ([], [])
    right_host(monkeypatch)
    with transaction(sessions) as session:
        assert enforce_deadlines(session).cancelled == []
        rows = session.execute(
            select(Job.state, Job.cancel_requested)
            .where(Job.id.in_([queued.id, running.id]))
            .order_by(Job.state)
        ).all()
    assert [tuple(row) for row in rows] == [
        (JobState.QUEUED.value, False),
        (JobState.RUNNING.value, False),
    ]


@ON_POSTGRES
def test_a_worker_on_a_fast_host_stops_at_the_deadline_not_before(
    sessions: sessionmaker[Session],
    alice: ApiUser,
    wrong_host: Any,
    settings: Settings,
    tmp_path: Path,
) -> None:
    late = make_job(sessions, alice, release=True, deadline=timedelta(minutes=2))
    past = make_job(sessions, alice, release=True, deadline=timedelta(milliseconds=1))
    fast = wrong_host(SKEW)
    context = WorkerContext(
        name="cuda0@fast",
        settings=settings,
        sessions=fast,
        redis=make_redis(settings.require_redis_url()),
        storage=LocalStorage(tmp_path / "results"),
        renderer=cast(KolorsRenderer, None),  # nothing renders here
    )
    runs = {}
    for job in (late, past):
        with transaction(fast) as session:
            spec = claim_job(session, job.id, context.name, LEASE)
        assert spec is not None and spec.claimed_at is not None
        assert near(spec.claimed_at, server_time(sessions))
        runs[job.id] = JobRun(context, spec)
    assert not runs[late.id].reporter.should_stop()  # 2 minutes left, though 3 past by its clock
    assert runs[late.id].reporter.deadline_passed is False
    assert runs[past.id].reporter.should_stop()
    assert runs[past.id].reporter.deadline_passed is True
