"""The credit ledger and job settlement on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from shared.accounts.ledger import get_balance, grant_credits, held_for_job, ledger_balance
from shared.db import transaction
from shared.errors import NotEnoughCredits, StaleAttempt
from shared.jobs.params import KolorsParams
from shared.jobs.transitions import (
    cancel_job,
    claim_job,
    fail_job,
    finish_job,
    record_image,
)
from shared.models import Job, JobState, LedgerEntry, LedgerKind, User
from tests.conftest import ApiUser, make_job, make_user, release_job

ONE = Decimal("1")
LEASE = timedelta(minutes=5)


def small(n: int = 1) -> KolorsParams:
    """A 512x512, 25-step request: 250 millicredits per image."""
    return KolorsParams(prompt="a cat", width=512, height=512, number_of_images=n)


def entries(sessions: sessionmaker[Session], job_id: str) -> list[tuple[str, int, int]]:
    with transaction(sessions) as session:
        rows = session.execute(
            select(LedgerEntry.kind, LedgerEntry.available_delta, LedgerEntry.held_delta)
            .where(LedgerEntry.job_id == job_id)
            .order_by(LedgerEntry.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def assert_books_balance(sessions: sessionmaker[Session], user: ApiUser) -> int:
    with transaction(sessions) as session:
        balance = get_balance(session, user.principal.user_id)
        assert ledger_balance(session, user.principal.user_id) == balance
        return balance


def deliver(sessions: sessionmaker[Session], job_id: str, attempt: int, index: int) -> None:
    with transaction(sessions) as session:
        record_image(
            session,
            job_id,
            attempt,
            index,
            seed=index,
            storage_key=f"k/{index}",
            content_type="image/webp",
            size_bytes=1,
        )


def test_submit_holds_full_price(sessions: sessionmaker[Session], alice: ApiUser) -> None:
    job = make_job(sessions, alice, small(4), price=ONE)
    assert entries(sessions, job.id) == [(LedgerKind.HOLD.value, -1000, 1000)]
    assert assert_books_balance(sessions, alice) == 9000


def test_not_enough_credits_leaves_no_job_and_no_entry(sessions: sessionmaker[Session]) -> None:
    poor = make_user(sessions, "poor", 200)
    with pytest.raises(NotEnoughCredits):
        make_job(sessions, poor, small(), price=ONE)
    with transaction(sessions) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert (
            session.scalar(
                select(func.count())
                .select_from(LedgerEntry)
                .where(LedgerEntry.kind != LedgerKind.GRANT.value)
            )
            == 0
        )
    assert assert_books_balance(sessions, poor) == 200


def test_complete_captures_each_image_and_settles_once(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job = make_job(sessions, alice, small(2), price=ONE)
    with transaction(sessions) as session:
        spec = claim_job(session, release_job(session, job.id), "w1", LEASE)
    assert spec is not None and spec.attempt == 1
    deliver(sessions, job.id, 1, 0)
    deliver(sessions, job.id, 1, 1)
    with transaction(sessions) as session:
        assert finish_job(session, job.id, 1) == JobState.COMPLETED
    assert entries(sessions, job.id) == [
        ("hold", -500, 500),
        ("capture", 0, -250),
        ("capture", 0, -250),
    ]
    assert assert_books_balance(sessions, alice) == 9500
    with pytest.raises(StaleAttempt), transaction(sessions) as session:
        finish_job(session, job.id, 1)


def test_failure_after_one_image_charges_one_and_releases_the_rest(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job = make_job(sessions, alice, small(3), price=ONE)
    with transaction(sessions) as session:
        assert claim_job(session, release_job(session, job.id), "w1", LEASE) is not None
    deliver(sessions, job.id, 1, 0)
    with transaction(sessions) as session:
        assert fail_job(session, job.id, "boom", attempt=1)
    with transaction(sessions) as session:
        assert not fail_job(session, job.id, "again")  # already terminal: no second release
        assert held_for_job(session, job.id) == 0
    assert entries(sessions, job.id)[-1] == ("release", 500, -500)
    assert assert_books_balance(sessions, alice) == 9750


def test_a_job_is_claimed_once_and_stale_attempts_cannot_write(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job = make_job(sessions, alice, small(), price=ONE)
    with transaction(sessions) as session:
        assert claim_job(session, release_job(session, job.id), "w1", LEASE) is not None
    with transaction(sessions) as session:
        assert claim_job(session, release_job(session, job.id), "w2", LEASE) is None
    with pytest.raises(StaleAttempt):
        deliver(sessions, job.id, 2, 0)
    with transaction(sessions) as session:
        assert session.get_one(Job, job.id).images_done == 0


def test_cancel_of_queued_job_releases_at_once_and_is_idempotent(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job = make_job(sessions, alice, small(2), price=ONE)
    for _ in range(2):
        with transaction(sessions) as session:
            assert cancel_job(session, alice.principal, job.id).state == JobState.CANCELLED.value
    with transaction(sessions) as session:
        assert claim_job(session, release_job(session, job.id), "w1", LEASE) is None
    assert [kind for kind, _, _ in entries(sessions, job.id)] == ["hold", "release"]
    assert assert_books_balance(sessions, alice) == 10_000


def test_cancel_of_running_job_keeps_delivered_images(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    job = make_job(sessions, alice, small(4), price=ONE)
    with transaction(sessions) as session:
        claim_job(session, release_job(session, job.id), "w1", LEASE)
    deliver(sessions, job.id, 1, 0)
    with transaction(sessions) as session:
        assert cancel_job(session, alice.principal, job.id).state == JobState.RUNNING.value
    with transaction(sessions) as session:
        assert finish_job(session, job.id, 1) == JobState.CANCELLED
    assert assert_books_balance(sessions, alice) == 9750


def test_balance_check_constraint_rejects_negative(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    with pytest.raises(IntegrityError), transaction(sessions) as session:
        session.get_one(User, alice.principal.user_id).balance = -1


def test_grant_adds_an_entry(sessions: sessionmaker[Session], alice: ApiUser) -> None:
    with transaction(sessions) as session:
        assert grant_credits(session, alice.principal.user_id, 500) == 10_500
    assert assert_books_balance(sessions, alice) == 10_500


def test_concurrent_submissions_never_overdraw(sessions: sessionmaker[Session]) -> None:
    """Many threads race to spend one balance: exactly what it covers is accepted."""
    user = make_user(sessions, "racer", 250 * 12)  # covers 12 small jobs
    accepted: list[str] = []
    refused: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def submit_many() -> None:
        barrier.wait()
        for _ in range(5):
            try:
                job = make_job(sessions, user, small(), price=ONE)
                with lock:
                    accepted.append(job.id)
            except NotEnoughCredits:
                with lock:
                    refused.append(1)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=submit_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(accepted) == 12
    assert len(refused) == 40 - 12
    assert assert_books_balance(sessions, user) == 0
    with transaction(sessions) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 12
