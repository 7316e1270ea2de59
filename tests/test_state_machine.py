"""A Hypothesis state machine over the job lifecycle and the credit ledger.

Random interleavings of submit, claim, deliver, finish, fail, cancel, lease
expiry, stale redelivery and deadlines run against the real domain functions on
a real database (a fresh, migrated SQLite file per run; the session's
PostgreSQL, emptied per run). After every step the books are checked: no
negative balance, cached balances equal the ledger, each job holds exactly what
its undelivered images cost, settled jobs hold nothing and were settled once,
and money is conserved.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Table, case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.accounts.ledger import get_balance, held_for_job, ledger_balance
from shared.accounts.pricing import price_per_image
from shared.accounts.users import Principal, create_user, set_tenant_weight, set_user_weight
from shared.db import make_engine, make_session_factory, transaction
from shared.errors import JobNotFound, NotEnoughCredits, StaleAttempt
from shared.jobs.params import KolorsParams
from shared.jobs.queries import job_state
from shared.jobs.transitions import (
    DEADLINE_ERROR,
    LeaseOutcome,
    RenderSpec,
    cancel_job,
    claim_job,
    enforce_deadlines,
    fail_job,
    finish_job,
    record_image,
    recover_expired_leases,
    release_next_jobs,
    submit_job,
    unrelease_job,
)
from shared.migrate import migrate_database
from shared.models import (
    LIVE_STATES,
    Base,
    Job,
    JobImage,
    JobState,
    LedgerEntry,
    LedgerKind,
    Tenant,
    TenantQueue,
    User,
    UserQueue,
    utcnow,
)
from shared.scheduling.fairshare import fair_order, pick_for_release
from shared.scheduling.positions import queue_place
from tests.conftest import empty_database, exact_queue, make_job, make_user, release_job

REFERENCE_PRICE = Decimal("1")
LEASE = timedelta(minutes=5)
MAX_ATTEMPTS = 3
# (name, tenant, millicredits): small balances, so NotEnoughCredits is a common outcome.
# alice and bob share a tenant (each may cancel the other's jobs); carol sees neither.
USERS: tuple[tuple[str, str, int], ...] = (
    ("alice", "acme", 2_000),
    ("bob", "acme", 1_000),
    ("carol", "other", 600),
)
WORKERS = ("worker-a", "worker-b")
SNAPSHOT_TABLES = (
    "users",
    "user_queues",
    "tenant_queues",
    "jobs",
    "job_images",
    "ledger_entries",
)

# No explain phase: it re-runs a failing case under a line tracer, minutes on this much
# SQLAlchemy code, to add little to the minimal example the shrink phase prints.
STATE_MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    phases=[phase for phase in Phase if phase is not Phase.explain],
)
# PostgreSQL answers each of the ~25 queries a step makes over a socket: 40 examples took
# ~40 s there against ~20 s on SQLite, so it runs fewer examples of the same machine, enough
# to catch a dialect difference while the whole file stays well under a minute.
POSTGRES_SETTINGS = settings(STATE_MACHINE_SETTINGS, max_examples=12)

# The invariants' queries, built once.
BALANCES = select(User.id, User.balance)
TOTAL_BALANCE = select(func.coalesce(func.sum(User.balance), 0))
LEDGER_TOTALS = select(
    func.coalesce(
        func.sum(
            case((LedgerEntry.kind == LedgerKind.GRANT.value, LedgerEntry.available_delta), else_=0)
        ),
        0,
    ),
    func.coalesce(func.sum(LedgerEntry.held_delta), 0),
    func.coalesce(
        -func.sum(
            case((LedgerEntry.kind == LedgerKind.CAPTURE.value, LedgerEntry.held_delta), else_=0)
        ),
        0,
    ),
)
IMAGES_PER_JOB = select(JobImage.job_id, func.count()).group_by(JobImage.job_id)
ENTRIES_PER_JOB = (
    select(LedgerEntry.job_id, LedgerEntry.kind, func.count())
    .where(LedgerEntry.job_id.is_not(None))
    .group_by(LedgerEntry.job_id, LedgerEntry.kind)
)

FreshDatabase = tuple[str, Callable[[], None]]
Snapshot = dict[str, list[tuple[Any, ...]]]


@dataclass(frozen=True)
class JobView:
    """The columns of a job row the model reasons about, read in one transaction."""

    job_id: str
    tenant_id: int
    user_id: int
    state: JobState
    attempt: int
    cancel_requested: bool
    number_of_images: int
    images_done: int
    price_per_image: int
    lease_expires_at: datetime | None
    deadline_at: datetime | None

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def held_by(self, attempt: int) -> bool:
        """Whether a worker that claimed `attempt` still holds the job."""
        return self.state == JobState.RUNNING and self.attempt == attempt


def to_view(job: Job) -> JobView:
    return JobView(
        job_id=job.id,
        tenant_id=job.tenant_id,
        user_id=job.user_id,
        state=JobState(job.state),
        attempt=job.attempt,
        cancel_requested=job.cancel_requested,
        number_of_images=job.number_of_images,
        images_done=job.images_done,
        price_per_image=job.price_per_image,
        lease_expires_at=job.lease_expires_at,
        deadline_at=job.deadline_at,
    )


def job_view(session: Session, job_id: str) -> JobView:
    return to_view(session.get_one(Job, job_id))


def all_job_views(session: Session) -> list[JobView]:
    return [to_view(job) for job in session.execute(select(Job).order_by(Job.id)).scalars()]


def delivered_indices(session: Session, job_id: str) -> frozenset[int]:
    return frozenset(
        session.execute(select(JobImage.index).where(JobImage.job_id == job_id)).scalars()
    )


def snapshot(session: Session) -> Snapshot:
    """Every row of the tables a refused or stale call must leave untouched."""
    result: Snapshot = {}
    for name in SNAPSHOT_TABLES:
        table: Table = Base.metadata.tables[name]
        rows = session.execute(select(table).order_by(*table.primary_key.columns))
        result[name] = [tuple(row) for row in rows]
    return result


@functools.cache
def migrated_sqlite_template() -> Path:
    """A directory holding one SQLite file migrated by migrate_database, made once per process.

    Each run copies it: a fresh, migrated file for a copy's price (a migration per run
    would cost about 0.15 s, several seconds per test and more while shrinking).
    """
    directory = Path(tempfile.mkdtemp(prefix="kolors-farm-sm-template-"))
    atexit.register(shutil.rmtree, directory, True)
    migrate_database(f"sqlite:///{directory / 'farm.db'}")
    return directory


def fresh_sqlite() -> FreshDatabase:
    """A new, migrated SQLite file in its own temporary directory."""
    directory = Path(tempfile.mkdtemp(prefix="kolors-farm-sm-"))
    shutil.copytree(migrated_sqlite_template(), directory, dirs_exist_ok=True)
    url = f"sqlite:///{directory / 'farm.db'}"
    return url, lambda: shutil.rmtree(directory, ignore_errors=True)


class JobLedgerMachine(RuleBasedStateMachine):
    """Jobs of a few users with small balances, driven through every lifecycle transition."""

    jobs = Bundle[str]("jobs")
    claims = Bundle[RenderSpec]("claims")

    def fresh_database(self) -> FreshDatabase:
        """A migrated, empty database for one run, and how to clean it up."""
        return fresh_sqlite()

    def __init__(self) -> None:
        super().__init__()
        url, self._cleanup = self.fresh_database()
        self.engine = make_engine(url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.principals: list[Principal] = []
        with transaction(self.sessions) as session:
            for name, tenant, millicredits in USERS:
                user, _key = create_user(session, name, tenant, millicredits)
                self.principals.append(
                    Principal(user_id=user.id, tenant_id=user.tenant_id, user_name=user.name)
                )
        self.granted = sum(millicredits for _name, _tenant, millicredits in USERS)

    def teardown(self) -> None:
        self.engine.dispose()
        self._cleanup()

    # -- helpers ----------------------------------------------------------------------------

    def read_job(self, job_id: str) -> JobView:
        with transaction(self.sessions) as session:
            return job_view(session, job_id)

    def read_snapshot(self) -> Snapshot:
        with transaction(self.sessions) as session:
            return snapshot(session)

    def assert_unchanged(self, before: Snapshot, what: str) -> None:
        after = self.read_snapshot()
        for name in SNAPSHOT_TABLES:
            assert after[name] == before[name], f"{what} changed table {name}"

    def record(self, session: Session, spec: RenderSpec, index: int) -> None:
        record_image(
            session,
            spec.job_id,
            spec.attempt,
            index,
            seed=spec.image_seed(index),
            storage_key=f"{spec.tenant_id}/{spec.job_id}/{index}.webp",
            content_type="image/webp",
            size_bytes=100 + index,
        )

    # -- rules ------------------------------------------------------------------------------

    @rule(
        target=jobs,
        user=st.integers(0, len(USERS) - 1),
        steps=st.integers(1, 50),
        images=st.integers(1, 4),
    )
    def submit(self, user: int, steps: int, images: int) -> str | MultipleResults[str]:
        principal = self.principals[user]
        params = KolorsParams(
            prompt="x", width=512, height=512, steps=steps, number_of_images=images
        )
        cost = price_per_image(512, 512, steps, REFERENCE_PRICE) * images
        with transaction(self.sessions) as session:
            balance = get_balance(session, principal.user_id)
            before = snapshot(session) if balance < cost else None
        try:
            with transaction(self.sessions) as session:
                job_id = submit_job(session, principal, params, REFERENCE_PRICE).id
        except NotEnoughCredits:
            assert before is not None, f"refused a {cost} hold on a balance of {balance}"
            self.assert_unchanged(before, "a refused submission")
            refused: MultipleResults[str] = multiple()
            return refused
        assert balance >= cost
        view = self.read_job(job_id)
        assert view.state == JobState.QUEUED
        assert (view.attempt, view.images_done) == (0, 0)
        with transaction(self.sessions) as session:
            assert get_balance(session, principal.user_id) == balance - cost
        return job_id

    @rule(target=claims, job_id=jobs, worker=st.sampled_from(WORKERS))
    def claim(self, job_id: str, worker: str) -> RenderSpec | MultipleResults[RenderSpec]:
        with transaction(self.sessions) as session:
            before = job_view(session, job_id)
            delivered = delivered_indices(session, job_id)
            claimable = before.state == JobState.QUEUED and not before.cancel_requested
            rows = None if claimable else snapshot(session)
        with transaction(self.sessions) as session:
            spec = claim_job(session, release_job(session, job_id), worker, LEASE)
        if spec is None:
            assert rows is not None, f"a claimable job was refused: {before}"
            self.assert_unchanged(rows, "a refused claim")
            refused: MultipleResults[RenderSpec] = multiple()
            return refused
        assert claimable, f"a job that is not claimable was claimed: {before}"
        assert spec.attempt == before.attempt + 1
        assert spec.delivered == delivered
        after = self.read_job(job_id)
        assert after.state == JobState.RUNNING
        assert after.attempt == spec.attempt
        assert after.lease_expires_at is not None
        return spec

    @rule(spec=claims, data=st.data())
    def deliver(self, spec: RenderSpec, data: st.DataObject) -> None:
        with transaction(self.sessions) as session:
            view = job_view(session, spec.job_id)
            delivered = delivered_indices(session, spec.job_id)
            before = None if view.held_by(spec.attempt) else snapshot(session)
        pending = [i for i in range(view.number_of_images) if i not in delivered]
        if view.held_by(spec.attempt) and not pending:
            return  # a worker never delivers more images than the job asked for
        index = data.draw(st.sampled_from(pending or sorted(delivered)), label="index")
        try:
            with transaction(self.sessions) as session:
                self.record(session, spec, index)
        except StaleAttempt:
            assert before is not None, f"the holder of {view} was refused"
            self.assert_unchanged(before, "a stale delivery")
            return
        assert view.held_by(spec.attempt), f"attempt {spec.attempt} delivered to {view}"
        after = self.read_job(spec.job_id)
        assert after.images_done == view.images_done + 1

    @rule(spec=claims, deadline_passed=st.booleans())
    def finish(self, spec: RenderSpec, deadline_passed: bool) -> None:
        reason = DEADLINE_ERROR if deadline_passed else None
        with transaction(self.sessions) as session:
            view = job_view(session, spec.job_id)
            before = None if view.held_by(spec.attempt) else snapshot(session)
        try:
            with transaction(self.sessions) as session:
                state = finish_job(session, spec.job_id, spec.attempt, reason)
        except StaleAttempt:
            assert before is not None, f"the holder of {view} was refused"
            self.assert_unchanged(before, "a stale finish")
            return
        assert view.held_by(spec.attempt), f"attempt {spec.attempt} finished {view}"
        stopped = view.cancel_requested or reason is not None
        assert state == (JobState.CANCELLED if stopped else JobState.COMPLETED)
        assert self.read_job(spec.job_id).state == state

    @rule(spec=claims)
    def fail(self, spec: RenderSpec) -> None:
        # The worker's error path: fail_job fenced with the attempt it claimed.
        with transaction(self.sessions) as session:
            view = job_view(session, spec.job_id)
            before = None if view.held_by(spec.attempt) else snapshot(session)
        with transaction(self.sessions) as session:
            failed = fail_job(session, spec.job_id, "The render failed", attempt=spec.attempt)
        if before is not None:
            assert not failed, (
                f"a worker whose attempt {spec.attempt} no longer holds the job failed it: {view}"
            )
            self.assert_unchanged(before, "a stale fail")
            return
        assert failed
        assert self.read_job(spec.job_id).state == JobState.FAILED

    @rule(job_id=jobs, user=st.integers(0, len(USERS) - 1))
    def cancel(self, job_id: str, user: int) -> None:
        principal = self.principals[user]
        with transaction(self.sessions) as session:
            view = job_view(session, job_id)
            before = snapshot(session) if principal.tenant_id != view.tenant_id else None
        if before is not None:
            with pytest.raises(JobNotFound), transaction(self.sessions) as session:
                cancel_job(session, principal, job_id)
            self.assert_unchanged(before, "a cancel from another tenant")
            return
        with transaction(self.sessions) as session:
            cancel_job(session, principal, job_id)
        after = self.read_job(job_id)
        if view.state == JobState.QUEUED:
            assert after.state == JobState.CANCELLED
        elif view.state == JobState.RUNNING:
            assert after.state == JobState.RUNNING
            assert after.cancel_requested
        else:
            assert after == view

    @rule(spec=claims)
    def expire(self, spec: RenderSpec) -> None:
        # Only a claim ever had a lease: drawing claims, not jobs, reaches RUNNING jobs often.
        job_id = spec.job_id
        with transaction(self.sessions) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
                .values(lease_expires_at=utcnow() - timedelta(hours=1))
            )
            view = job_view(session, job_id)
        with transaction(self.sessions) as session:
            outcomes = recover_expired_leases(session, max_attempts=MAX_ATTEMPTS)
        after = self.read_job(job_id)
        if view.state != JobState.RUNNING:
            assert outcomes == []
            assert after == view
            return
        if view.cancel_requested:
            ended = JobState.CANCELLED  # a cancel or deadline arrived before the worker died
        elif view.attempt >= MAX_ATTEMPTS:
            ended = JobState.FAILED
        else:
            ended = JobState.QUEUED
        assert outcomes == [LeaseOutcome(job_id, view.attempt, ended)]
        assert after.state == ended
        assert after.lease_expires_at is None
        assert after.attempt == view.attempt

    @rule(spec=claims, data=st.data())
    def redeliver(self, spec: RenderSpec, data: st.DataObject) -> None:
        # A stale worker (or a redelivered message) replays an old attempt's writes.
        with transaction(self.sessions) as session:
            view = job_view(session, spec.job_id)
            if view.held_by(spec.attempt):
                return  # this attempt is current, not stale
            before = snapshot(session)
        index = data.draw(st.integers(0, view.number_of_images - 1), label="index")
        # The session commits after each refusal: the refused call itself must write nothing.
        with transaction(self.sessions) as session, pytest.raises(StaleAttempt):
            self.record(session, spec, index)
        with transaction(self.sessions) as session, pytest.raises(StaleAttempt):
            finish_job(session, spec.job_id, spec.attempt)
        self.assert_unchanged(before, "a stale redelivery")

    @rule(job_id=jobs)
    def deadline(self, job_id: str) -> None:
        with transaction(self.sessions) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(deadline_at=utcnow() - timedelta(minutes=1))
            )
            views = all_job_views(session)
        with transaction(self.sessions) as session:
            outcome = enforce_deadlines(session)
        now = utcnow()
        past = [v for v in views if v.deadline_at is not None and v.deadline_at < now]
        assert sorted(outcome.cancelled) == sorted(
            v.job_id for v in past if v.state == JobState.QUEUED
        )
        assert sorted(outcome.running) == sorted(
            v.job_id for v in past if v.state == JobState.RUNNING and not v.cancel_requested
        )
        with transaction(self.sessions) as session:
            now_views = {view.job_id: view for view in all_job_views(session)}
        for view in past:
            after = now_views[view.job_id]
            if view.state == JobState.QUEUED:
                assert after.state == JobState.CANCELLED
            elif view.state == JobState.RUNNING:
                assert after.state == JobState.RUNNING
                assert after.cancel_requested

    @rule(slots=st.integers(1, 4), cap=st.integers(0, 2))
    def release(self, slots: int, cap: int) -> None:
        # The dispatcher's decision, from the users' lines, against the full fair order.
        with transaction(self.sessions) as session:
            waiting, state = exact_queue(session)
        expected = pick_for_release(fair_order(waiting, state), slots, state, cap)
        with transaction(self.sessions) as session:
            released = release_next_jobs(session, slots, cap)
        assert released == [q.job_id for q in expected]
        for job_id in released:
            view = self.read_job(job_id)
            assert view.state == JobState.QUEUED

    @rule(job_id=jobs)
    def unrelease(self, job_id: str) -> None:
        # A release whose message could not be published goes back in line.
        before = self.read_job(job_id)
        with transaction(self.sessions) as session:
            unrelease_job(session, job_id)
            released_at = session.execute(
                select(Job.released_at).where(Job.id == job_id)
            ).scalar_one()
        if before.state == JobState.QUEUED:
            assert released_at is None
        else:
            assert self.read_job(job_id) == before

    @rule(user=st.integers(0, len(USERS) - 1), weight=st.integers(1, 3), tenant=st.booleans())
    def reweigh(self, user: int, weight: int, tenant: bool) -> None:
        name, tenant_name, _credits = USERS[user]
        with transaction(self.sessions) as session:
            if tenant:
                set_tenant_weight(session, tenant_name, weight)
            else:
                set_user_weight(session, name, weight)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        """Every invariant, read in one transaction (one line per step in a failing example)."""
        with transaction(self.sessions) as session:
            self.check_balances(session)
            self.check_money_is_conserved(session)
            self.check_jobs(session)
            self.check_lines(session)
            self.check_tenants(session)
            self.check_positions(session)

    def check_lines(self, session: Session) -> None:
        """Each user's line row is what its jobs say, and its waiting jobs are numbered in order."""
        for principal in self.principals:
            line = session.get_one(UserQueue, principal.user_id)
            mine = session.execute(
                select(Job).where(Job.user_id == principal.user_id).order_by(Job.created_at, Job.id)
            ).scalars()
            waiting = []
            in_flight = 0
            for job in mine:
                if job.state == JobState.QUEUED.value and job.released_at is None:
                    waiting.append(job)
                elif job.state == JobState.RUNNING.value or job.state == JobState.QUEUED.value:
                    in_flight += 1
                    assert job.released_at is not None, "a running job that was never released"
            who = principal.user_name
            assert line.waiting == len(waiting), f"{who}: waiting"
            assert line.in_flight == in_flight, f"{who}: in flight"
            assert line.waiting_work == sum(job.work for job in waiting), f"{who}: work"
            seqs = [job.queue_seq for job in waiting]
            assert seqs == list(range(line.head_seq, line.head_seq + len(waiting))), (
                f"{who}: line numbers {seqs} from {line.head_seq}"
            )
            if waiting:
                assert (line.head_job_id, line.head_created_at) == (
                    waiting[0].id,
                    waiting[0].created_at,
                ), f"{who}: head"
                assert (line.tail_job_id, line.tail_created_at) == (
                    waiting[-1].id,
                    waiting[-1].created_at,
                ), f"{who}: tail"

    def check_tenants(self, session: Session) -> None:
        """Each tenant's queue sums its users' lines and names the tenant's next job."""
        waiting, state = exact_queue(session)
        order = fair_order(waiting, state)
        for tenant in session.execute(select(TenantQueue)).scalars():
            lines = session.execute(
                select(UserQueue).where(UserQueue.tenant_id == tenant.tenant_id)
            ).scalars()
            rows = list(lines)
            size = sum(line.waiting for line in rows)
            assert tenant.waiting == size
            assert tenant.in_flight == sum(line.in_flight for line in rows)
            assert tenant.waiting_work == sum(line.waiting_work for line in rows)
            weight = session.get_one(Tenant, tenant.tenant_id).weight
            assert tenant.weight == weight
            mine = [q for q in order if q.tenant_id == tenant.tenant_id]
            if not size:
                assert tenant.first_job_id is None and tenant.first_vt is None
                continue
            assert tenant.first_job_id == mine[0].job_id, "the tenant's next job"
            assert tenant.first_vt == (tenant.in_flight + 1) / weight
            heads = [line.head_created_at for line in rows if line.head_created_at]
            tails = [line.tail_created_at for line in rows if line.tail_created_at]
            assert (tenant.oldest_created_at, tenant.newest_created_at) == (min(heads), max(tails))

    def check_positions(self, session: Session) -> None:
        """Every queued job's place is its exact place in the full fair order."""
        waiting, state = exact_queue(session)
        released = session.execute(
            select(Job).where(Job.state == "QUEUED", Job.released_at.is_not(None))
        ).scalars()
        released_count = len(list(released))
        for position, queued in enumerate(fair_order(waiting, state)):
            job = session.get_one(Job, queued.job_id)
            assert queue_place(session, job).position == released_count + position, queued

    def check_balances(self, session: Session) -> None:
        balances = {user_id: balance for user_id, balance in session.execute(BALANCES)}
        for principal in self.principals:
            balance = balances[principal.user_id]
            assert balance >= 0, f"{principal.user_name} has a negative balance {balance}"
            assert balance == ledger_balance(session, principal.user_id), (
                f"{principal.user_name}'s cached balance differs from the ledger"
            )

    def check_money_is_conserved(self, session: Session) -> None:
        """Granted = balances + amounts still held + amounts captured."""
        balances = session.execute(TOTAL_BALANCE).scalar_one()
        granted, held, captured = session.execute(LEDGER_TOTALS).one()
        assert int(granted) == self.granted
        total = int(balances) + int(held) + int(captured)
        assert total == self.granted, (
            f"granted {self.granted}, accounted for {total} "
            f"(balances {balances}, held {held}, captured {captured})"
        )

    def check_jobs(self, session: Session) -> None:
        """Live jobs hold what their undelivered images cost; settled jobs were settled once."""
        views = all_job_views(session)
        images = Counter({job_id: count for job_id, count in session.execute(IMAGES_PER_JOB)})
        entries = Counter(
            {(job_id, kind): count for job_id, kind, count in session.execute(ENTRIES_PER_JOB)}
        )
        for view in views:
            held = held_for_job(session, view.job_id)
            assert view.images_done == images[view.job_id], f"image rows differ: {view}"
            assert entries[(view.job_id, LedgerKind.HOLD.value)] == 1, f"holds: {view}"
            captures = entries[(view.job_id, LedgerKind.CAPTURE.value)]
            releases = entries[(view.job_id, LedgerKind.RELEASE.value)]
            assert captures == view.images_done, f"{captures} captures for {view}"
            if view.live:
                owed = view.price_per_image * (view.number_of_images - view.images_done)
                assert held == owed, f"holds {held}, owes {owed}: {view}"
                assert releases == 0, f"a live job was released: {view}"
            else:
                assert held == 0, f"a settled job still holds {held}: {view}"
                assert releases <= 1, f"{releases} releases for {view}"
            if view.state != JobState.RUNNING:
                assert view.lease_expires_at is None, f"a lease outlived its claim: {view}"
            # No worker may claim it and the dispatcher never releases it: it would hold its
            # credits and a live-job slot forever.
            assert not (view.state == JobState.QUEUED and view.cancel_requested), (
                f"a queued job no worker may ever claim: {view}"
            )


class PostgresJobLedgerMachine(JobLedgerMachine):
    """The same machine on PostgreSQL; the URL is set by the test from the session fixture."""

    url = ""

    def fresh_database(self) -> FreshDatabase:
        return empty_database(self.url), lambda: None


def test_job_lifecycle_and_ledger_on_sqlite() -> None:
    run_state_machine_as_test(JobLedgerMachine, settings=STATE_MACHINE_SETTINGS)


def test_job_lifecycle_and_ledger_on_postgresql(postgres_database: str) -> None:
    PostgresJobLedgerMachine.url = postgres_database
    run_state_machine_as_test(PostgresJobLedgerMachine, settings=POSTGRES_SETTINGS)


def test_a_stale_worker_cannot_fail_its_requeued_job(sessions: sessionmaker[Session]) -> None:
    """The smallest case the machine's `fail` rule found (fixed since), on both databases.

    A worker's lease expires and recovery requeues the job (QUEUED, attempt unchanged);
    the stale worker's render then raises, and its fenced fail_job must not end the job
    that is waiting for another attempt.
    """
    alice = make_user(sessions, "alice", 1_000)
    params = KolorsParams(prompt="x", width=512, height=512, steps=1)
    job_id = make_job(sessions, alice, params, price=REFERENCE_PRICE).id
    with transaction(sessions) as session:
        spec = claim_job(session, release_job(session, job_id), "worker-a", LEASE)
    assert spec is not None
    with transaction(sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(hours=1))
        )
    with transaction(sessions) as session:
        outcomes = recover_expired_leases(session, max_attempts=MAX_ATTEMPTS)
    assert outcomes == [LeaseOutcome(job_id, spec.attempt, JobState.QUEUED)]
    with transaction(sessions) as session:
        failed = fail_job(session, job_id, "The render failed", attempt=spec.attempt)
    with transaction(sessions) as session:
        state = job_state(session, job_id)
        held = held_for_job(session, job_id)
    assert (failed, state, held) == (False, JobState.QUEUED, 10), (
        "a worker whose claim was lost failed the requeued job"
    )
