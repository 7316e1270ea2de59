"""The audit of the books (`audit_books`, `kolors-farm audit`) on SQLite and PostgreSQL.

Clean books are built the way the farm writes them (submission, release, claim,
stored and recorded images, a completion, a cancel, a failure); each corruption is
then made by hand, as a bug or an operator's edit would, and must be found and
named: by rule, and by the job or user it is about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import boto3
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from control.processes import free_port
from shared.db import read_only, transaction
from shared.jobs.audit import BooksAudit, Rule, audit_books
from shared.jobs.params import KolorsParams
from shared.jobs.transitions import (
    cancel_job,
    claim_job,
    fail_job,
    image_storage_key,
    record_image,
)
from shared.models import Job, JobImage, LedgerEntry, LedgerKind, UsageDay, User, utcnow
from shared.storage import LocalStorage, S3Storage
from tests.conftest import ApiUser, make_job, make_user, release_job

REPO = Path(__file__).resolve().parent.parent
LEASE = timedelta(minutes=5)


@dataclass
class Books:
    """A set of books with one job in each end state, and two live ones."""

    sessions: sessionmaker[Session]
    storage: LocalStorage
    alice: ApiUser
    bob: ApiUser
    completed: Job  # alice, 2 images delivered
    cancelled: Job  # alice, cancelled while queued: its whole hold released
    failed: Job  # bob, failed after 1 of its 3 images
    queued: Job  # bob, waiting
    running: Job  # bob, claimed under a lease, 1 of 2 images delivered

    def audit(
        self, *, require_terminal: bool = False, now: datetime | None = None, batch_size: int = 500
    ) -> BooksAudit:
        with read_only(self.sessions) as session:
            return audit_books(
                session,
                self.storage,
                require_terminal=require_terminal,
                now=now,
                batch_size=batch_size,
            )


def _job(sessions: sessionmaker[Session], user: ApiUser, images: int) -> Job:
    params = KolorsParams(prompt="x", width=512, height=512, steps=5, number_of_images=images)
    return make_job(sessions, user, params)


def _claim(sessions: sessionmaker[Session], job: Job) -> int:
    with transaction(sessions) as session:
        spec = claim_job(session, release_job(session, job.id), "w0", LEASE)
        assert spec is not None
        return spec.attempt


def _deliver(
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    job: Job,
    attempt: int,
    index: int,
    *,
    finish: bool = False,
) -> None:
    """Store image `index` and record it, as a worker does (stored first)."""
    key = image_storage_key(job.tenant_id, job.id, index, "webp")
    storage.put(key, b"RIFF-image-%d" % index, "image/webp")
    with transaction(sessions) as session:
        record_image(
            session,
            job.id,
            attempt,
            index,
            seed=job.seed + index,
            storage_key=key,
            content_type="image/webp",
            size_bytes=12,
            finish=finish,
        )


@pytest.fixture
def books(sessions: sessionmaker[Session], tmp_path: Path) -> Books:
    storage = LocalStorage(tmp_path / "results")
    alice = make_user(sessions, "alice", 100_000, "design")
    bob = make_user(sessions, "bob", 100_000, "research")
    completed = _job(sessions, alice, 2)
    attempt = _claim(sessions, completed)
    _deliver(sessions, storage, completed, attempt, 0)
    _deliver(sessions, storage, completed, attempt, 1, finish=True)
    cancelled = _job(sessions, alice, 2)
    with transaction(sessions) as session:
        cancel_job(session, alice.principal, cancelled.id)
    failed = _job(sessions, bob, 3)
    attempt = _claim(sessions, failed)
    _deliver(sessions, storage, failed, attempt, 0)
    with transaction(sessions) as session:
        assert fail_job(session, failed.id, "render failed", attempt=attempt)
    queued = _job(sessions, bob, 1)
    running = _job(sessions, bob, 2)
    attempt = _claim(sessions, running)
    _deliver(sessions, storage, running, attempt, 0)
    return Books(sessions, storage, alice, bob, completed, cancelled, failed, queued, running)


def found(audit: BooksAudit) -> set[tuple[Rule, str | None, str | None]]:
    return {(finding.rule, finding.job_id, finding.user) for finding in audit.findings}


def test_clean_books_audit_clean_and_everything_is_counted(books: Books) -> None:
    with read_only(books.sessions) as session:
        states = {row.id: row.state for row in session.execute(select(Job.id, Job.state))}
    assert sorted(states.values()) == ["CANCELLED", "COMPLETED", "FAILED", "QUEUED", "RUNNING"]
    audit = books.audit()
    assert audit.findings == [] and audit.clean
    assert (audit.jobs, audit.live_jobs, audit.users) == (5, 2, 2)
    assert audit.images == 4 and audit.objects == 4
    # Grants 2 + holds 5 + captures 4 + releases 2 (the cancel's, the failure's).
    assert audit.ledger_entries == 13


def test_pages_of_one_find_what_one_page_finds(books: Books) -> None:
    with transaction(books.sessions) as session:
        session.execute(update(User).where(User.name == "bob").values(balance=User.balance + 1))
    whole = books.audit()
    paged = books.audit(batch_size=1)
    assert found(paged) == found(whole) != set()
    counts = ("jobs", "live_jobs", "users", "ledger_entries", "images", "objects")
    assert [getattr(paged, name) for name in counts] == [getattr(whole, name) for name in counts]


def test_live_jobs_are_findings_once_every_job_should_have_ended(books: Books) -> None:
    audit = books.audit(require_terminal=True)
    assert found(audit) == {
        (Rule.NOT_TERMINAL, books.queued.id, "bob"),
        (Rule.NOT_TERMINAL, books.running.id, "bob"),
    }


def test_a_running_job_whose_lease_lapsed_is_found(books: Books) -> None:
    assert books.audit(now=utcnow() + LEASE / 2).clean
    later = books.audit(now=utcnow() + LEASE * 2)
    assert found(later) == {(Rule.LEASE_LAPSED, books.running.id, "bob")}


def test_a_second_capture_is_found(books: Books) -> None:
    job = books.completed
    with transaction(books.sessions) as session:
        session.add(
            LedgerEntry(
                user_id=job.user_id,
                job_id=job.id,
                kind=LedgerKind.CAPTURE.value,
                available_delta=0,
                held_delta=-job.price_per_image,
            )
        )
    audit = books.audit()
    assert found(audit) == {
        (Rule.CAPTURE_COUNT, job.id, "alice"),
        (Rule.HOLD_OUTSTANDING, job.id, "alice"),  # settled beyond its hold
        (Rule.BALANCE_GRANTS, None, "alice"),  # captured more than it delivered
        (Rule.USAGE_ROLLUP, None, "alice"),  # written beside the ledger's own path
    }
    detail = next(f.detail for f in audit.findings if f.rule == Rule.CAPTURE_COUNT)
    assert detail == "3 captures for 2 delivered images"


def test_a_release_never_written_is_found(books: Books) -> None:
    # As a settlement bug would leave it: the job ended, its hold never came back.
    job = books.cancelled
    with transaction(books.sessions) as session:
        released = session.scalar(
            delete(LedgerEntry)
            .where(LedgerEntry.job_id == job.id, LedgerEntry.kind == LedgerKind.RELEASE.value)
            .returning(LedgerEntry.available_delta)
        )
        assert released == job.price_per_image * 2
        session.execute(
            update(User).where(User.id == job.user_id).values(balance=User.balance - released)
        )
        session.execute(
            update(UsageDay)
            .where(UsageDay.user_id == job.user_id)
            .values(released=UsageDay.released - released)
        )
    assert found(books.audit()) == {
        (Rule.HOLD_OUTSTANDING, job.id, "alice"),
        (Rule.BALANCE_GRANTS, None, "alice"),
    }


def test_a_deleted_release_entry_is_found(books: Books) -> None:
    job = books.failed
    with transaction(books.sessions) as session:
        session.execute(
            delete(LedgerEntry).where(
                LedgerEntry.job_id == job.id, LedgerEntry.kind == LedgerKind.RELEASE.value
            )
        )
    assert found(books.audit()) == {
        (Rule.HOLD_OUTSTANDING, job.id, "bob"),
        (Rule.BALANCE_LEDGER, None, "bob"),
        (Rule.USAGE_ROLLUP, None, "bob"),
    }


def test_a_second_release_is_found(books: Books) -> None:
    job = books.cancelled
    refund = job.price_per_image * 2
    with transaction(books.sessions) as session:
        session.add(
            LedgerEntry(
                user_id=job.user_id,
                job_id=job.id,
                kind=LedgerKind.RELEASE.value,
                available_delta=refund,
                held_delta=-refund,
            )
        )
    assert found(books.audit()) == {
        (Rule.RELEASE_COUNT, job.id, "alice"),
        (Rule.HOLD_OUTSTANDING, job.id, "alice"),
        (Rule.BALANCE_LEDGER, None, "alice"),
        (Rule.USAGE_ROLLUP, None, "alice"),
    }


def test_a_second_hold_out_of_shape_is_found(books: Books) -> None:
    job = books.completed
    with transaction(books.sessions) as session:
        session.add(
            LedgerEntry(
                user_id=job.user_id,
                job_id=job.id,
                kind=LedgerKind.HOLD.value,
                available_delta=0,  # a hold takes from the balance what it holds
                held_delta=5,
            )
        )
    audit = books.audit()
    rules = {rule for rule, job_id, _ in found(audit) if job_id == job.id}
    assert rules == {Rule.HOLD_COUNT, Rule.HOLD_AMOUNT, Rule.ENTRY_MALFORMED, Rule.HOLD_OUTSTANDING}


def test_a_deleted_object_is_found(books: Books) -> None:
    key = image_storage_key(books.completed.tenant_id, books.completed.id, 1, "webp")
    books.storage.delete(key)
    audit = books.audit()
    assert found(audit) == {(Rule.OBJECT_MISSING, books.completed.id, "alice")}
    assert audit.findings[0].detail == f"no object {key}"


def test_an_orphan_object_is_found_and_a_write_in_progress_is_not(books: Books) -> None:
    job = books.failed
    orphan = image_storage_key(job.tenant_id, job.id, 2, "webp")
    books.storage.put(orphan, b"stored, never recorded", "image/webp")
    in_progress = books.storage.root / f"{job.tenant_id}/{job.id}/.tmp-abc"
    in_progress.write_bytes(b"half")
    audit = books.audit()
    assert found(audit) == {(Rule.OBJECT_ORPHANED, job.id, "bob")}
    assert orphan in audit.findings[0].detail
    # Under a live job an unrecorded object may still be on its way: no finding.
    running = books.running
    books.storage.put(image_storage_key(running.tenant_id, running.id, 1, "webp"), b"x", "")
    assert found(books.audit()) == found(audit)


def test_an_image_record_lost_is_found(books: Books) -> None:
    job = books.completed
    with transaction(books.sessions) as session:
        session.execute(delete(JobImage).where(JobImage.job_id == job.id, JobImage.index == 1))
    assert found(books.audit()) == {
        (Rule.IMAGE_COUNT, job.id, "alice"),
        (Rule.OBJECT_ORPHANED, job.id, "alice"),
    }


def test_an_edited_balance_is_found(books: Books) -> None:
    with transaction(books.sessions) as session:
        balance = session.scalar(
            update(User)
            .where(User.name == "alice")
            .values(balance=User.balance + 7)
            .returning(User.balance)
        )
    assert balance is not None
    audit = books.audit()
    assert found(audit) == {
        (Rule.BALANCE_LEDGER, None, "alice"),
        (Rule.BALANCE_GRANTS, None, "alice"),
    }
    detail = {f.rule: f.detail for f in audit.findings}[Rule.BALANCE_LEDGER]
    assert detail == f"balance {balance}, its ledger sums to {balance - 7}"


def test_findings_beyond_the_cap_are_counted_not_kept(books: Books) -> None:
    with transaction(books.sessions) as session:
        session.execute(update(User).values(balance=User.balance + 1))
    with read_only(books.sessions) as session:
        audit = audit_books(session, books.storage, max_findings=1)
    assert len(audit.findings) == 1 and audit.total_findings == 4  # 2 rules x 2 users
    assert not audit.clean


# ---------------------------------------------------------------- storage listings


def test_local_storage_lists_keys_under_a_prefix(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "results")
    for key in ("1/ab/0.webp", "1/ab/1.webp", "1/abc/0.png", "2/ab/0.webp", "1/ab/x/deep.png"):
        storage.put(key, b"x", "")
    (storage.root / "1/ab/.tmp-half").write_bytes(b"h")
    assert sorted(storage.keys("1/ab/")) == ["1/ab/0.webp", "1/ab/1.webp", "1/ab/x/deep.png"]
    assert sorted(storage.keys("1/ab")) == [
        "1/ab/0.webp",
        "1/ab/1.webp",
        "1/ab/x/deep.png",
        "1/abc/0.png",
    ]
    assert len(list(storage.keys(""))) == 5
    assert list(storage.keys("9/")) == []
    for bad in ("../", "/etc/", "1/../../"):
        with pytest.raises(ValueError, match="invalid storage prefix"):
            list(storage.keys(bad))


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    bucket = f"audit-{uuid.uuid4().hex[:12]}"  # moto's buckets outlive its servers
    boto3.client("s3").create_bucket(Bucket=bucket)
    try:
        yield bucket
    finally:
        server.stop()


def test_s3_storage_lists_keys_under_its_prefix_page_by_page(s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, "farm")
    other = S3Storage(s3_bucket, "other")
    for index in range(5):
        storage.put(f"1/ab/{index}.webp", b"x", "image/webp")
    storage.put("1/abc/0.webp", b"x", "image/webp")
    other.put("1/ab/9.webp", b"x", "image/webp")  # another prefix of the bucket
    storage.list_page_size = 2  # three pages for the five
    assert list(storage.keys("1/ab/")) == [f"1/ab/{index}.webp" for index in range(5)]
    assert len(list(storage.keys(""))) == 6
    assert list(other.keys("")) == ["1/ab/9.webp"]
    with pytest.raises(ValueError, match="invalid storage prefix"):
        list(storage.keys("../"))


# ---------------------------------------------------------------- the command


def test_kolors_farm_audit_prints_the_counts_and_exits_1_on_a_finding(
    books: Books, database_url: str, tmp_path: Path
) -> None:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        KOLORS_FARM_DATA_DIR=str(tmp_path / "var"),
        KOLORS_FARM_DATABASE_URL=database_url,
        KOLORS_FARM_STORAGE_URL=f"file://{books.storage.root}",
        COLUMNS="200",
    )

    def audit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "control", "audit", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    clean = audit()
    assert clean.returncode == 0, clean.stderr
    assert "nothing found" in clean.stdout and "stored objects" in clean.stdout
    drained = audit("--require-terminal")
    assert drained.returncode == 1
    assert "not_terminal" in drained.stdout and books.queued.id in drained.stdout
    books.storage.delete(image_storage_key(books.failed.tenant_id, books.failed.id, 0, "webp"))
    broken = audit("--json")
    assert broken.returncode == 1
    document = json.loads(broken.stdout)
    assert document["clean"] is False and document["checked"]["jobs"] == 5
    assert document["findings"] == [
        {
            "rule": "object_missing",
            "job_id": books.failed.id,
            "user": "bob",
            "detail": f"no object {books.failed.tenant_id}/{books.failed.id}/0.webp",
        }
    ]
    assert "Exits 1 when anything is found." in " ".join(audit("--help").stdout.split())
