"""An audit of the books: jobs, their settlements, balances, images and stored objects.

`audit_books` is an operator's explicit check (`kolors-farm audit`, and the fault
tests after each fault), not a request path. It reads the jobs and the users in
keyset pages by id, each page with a few grouped reads of the ledger, the images
and the usage rollup, so it never holds a table in memory, and it changes nothing.
For a consistent picture of a farm that is running, give it a session whose
transaction sees one snapshot: SQLite's read transactions do; on PostgreSQL, use
REPEATABLE READ (`kolors-farm audit` does).

The rules, each a `Rule`:

- every job is terminal or legitimately live: QUEUED, or RUNNING under a lease that
  has not lapsed (with `require_terminal`, as after a load has drained, a live job is
  itself a finding);
- every job's hold is settled exactly once: one HOLD of its full price (none for a
  free cache hit), one CAPTURE of the image price per delivered image, at most one
  RELEASE and none while it is live, nothing held once it ended, every entry shaped
  as its kind says and the job's user's;
- one image record per delivered image, each index once and within the request;
- every user's stored balance equals its ledger's sum, and equals its grants less
  its captures less what its live jobs hold; its usage rollup sums to its ledger;
- every recorded image's object exists in storage (while the job's results are
  kept), and every object stored under a finished job's key prefix has its record.
"""

from __future__ import annotations

import enum
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from shared.models import (
    LIVE_STATES,
    TERMINAL_STATES,
    Job,
    JobImage,
    JobState,
    LedgerEntry,
    LedgerKind,
    UsageDay,
    User,
    utcnow,
)
from shared.storage import ResultStorage

DEFAULT_BATCH: Final = 500
DEFAULT_MAX_FINDINGS: Final = 10_000
_LIVE: Final = tuple(state.value for state in LIVE_STATES)
_TERMINAL: Final = tuple(state.value for state in TERMINAL_STATES)


class Rule(enum.StrEnum):
    """A rule of the books; a finding names the one it breaks."""

    NOT_TERMINAL = "not_terminal"
    LEASE_LAPSED = "lease_lapsed"
    HOLD_COUNT = "hold_count"
    HOLD_AMOUNT = "hold_amount"
    CAPTURE_COUNT = "capture_count"
    CAPTURE_AMOUNT = "capture_amount"
    RELEASE_COUNT = "release_count"
    HOLD_OUTSTANDING = "hold_outstanding"
    ENTRY_MALFORMED = "entry_malformed"
    ENTRY_OTHER_USER = "entry_other_user"
    IMAGE_COUNT = "image_count"
    IMAGE_INDEX = "image_index"
    OBJECT_MISSING = "object_missing"
    OBJECT_ORPHANED = "object_orphaned"
    BALANCE_LEDGER = "balance_ledger"
    BALANCE_GRANTS = "balance_grants"
    USAGE_ROLLUP = "usage_rollup"


RULE_TEXT: Final = {
    Rule.NOT_TERMINAL: "a job still live where every job should have ended",
    Rule.LEASE_LAPSED: "a RUNNING job whose lease lapsed (recovery has not taken it back)",
    Rule.HOLD_COUNT: "a job without exactly one hold (none for a free one)",
    Rule.HOLD_AMOUNT: "a hold that is not the job's full price",
    Rule.CAPTURE_COUNT: "captures not one per delivered image",
    Rule.CAPTURE_AMOUNT: "a capture that is not the job's image price",
    Rule.RELEASE_COUNT: "more than one release, or a release of a live job",
    Rule.HOLD_OUTSTANDING: "credits still held (or over-settled) for an ended job",
    Rule.ENTRY_MALFORMED: "a ledger entry whose amounts do not match its kind",
    Rule.ENTRY_OTHER_USER: "a job's ledger entry on another user's account",
    Rule.IMAGE_COUNT: "image records not one per delivered image",
    Rule.IMAGE_INDEX: "an image index recorded twice or outside the request",
    Rule.OBJECT_MISSING: "a recorded image whose object is not in storage",
    Rule.OBJECT_ORPHANED: "an object under a finished job's prefix with no image record",
    Rule.BALANCE_LEDGER: "a stored balance that is not the sum of its ledger",
    Rule.BALANCE_GRANTS: "a balance that is not grants - captures - live holds",
    Rule.USAGE_ROLLUP: "a usage rollup that does not sum to the ledger",
}


@dataclass(frozen=True)
class Finding:
    """One broken rule: which, about which job and/or user, and what was seen."""

    rule: Rule
    detail: str
    job_id: str | None = None
    user: str | None = None


@dataclass
class BooksAudit:
    """What an audit checked and what it found.

    `findings` keeps at most the audit's `max_findings`; `by_rule` counts every one.
    """

    jobs: int = 0
    live_jobs: int = 0
    users: int = 0
    ledger_entries: int = 0
    images: int = 0
    objects: int = 0
    findings: list[Finding] = field(default_factory=list)
    by_rule: Counter[Rule] = field(default_factory=Counter)
    max_findings: int = DEFAULT_MAX_FINDINGS

    @property
    def clean(self) -> bool:
        """Whether nothing was found."""
        return not self.by_rule

    @property
    def total_findings(self) -> int:
        """Every finding, kept in `findings` or not."""
        return sum(self.by_rule.values())

    def add(self, finding: Finding) -> None:
        """Count a finding; keep it while under `max_findings`."""
        self.by_rule[finding.rule] += 1
        if len(self.findings) < self.max_findings:
            self.findings.append(finding)


@dataclass(frozen=True)
class _JobRow:
    id: str
    user_id: int
    tenant_id: int
    state: str
    number_of_images: int
    images_done: int
    price_per_image: int
    lease_expires_at: datetime | None
    results_deleted_at: datetime | None


@dataclass(frozen=True)
class _Entry:
    user_id: int
    kind: str
    available: int
    held: int


def audit_books(
    session: Session,
    storage: ResultStorage,
    *,
    require_terminal: bool = False,
    now: datetime | None = None,
    batch_size: int = DEFAULT_BATCH,
    max_findings: int = DEFAULT_MAX_FINDINGS,
) -> BooksAudit:
    """Check every job, user and stored image against the rules above; commits nothing.

    `now` decides whether a running job's lease has lapsed; by default the database's
    clock (DESIGN 11), at the start of the session's transaction on PostgreSQL: the
    moment of its snapshot. With `require_terminal`, every live job is a finding (an
    audit after a load has drained).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    audit = BooksAudit(max_findings=max_findings)
    moment = now or _database_now(session)
    after: str | None = None
    while True:
        page = _job_page(session, after, batch_size)
        if not page:
            break
        _audit_jobs(session, storage, page, audit, require_terminal, moment)
        after = page[-1].id
    after_user: int | None = None
    while True:
        users = _user_page(session, after_user, batch_size)
        if not users:
            break
        _audit_users(session, users, audit)
        after_user = users[-1][0]
    return audit


def _database_now(session: Session) -> datetime:
    """The database's time: its transaction's start on PostgreSQL; SQLite is this host."""
    if session.get_bind().dialect.name == "sqlite":
        return utcnow()  # embedded: the database's clock is this host's
    moment = session.scalar(select(func.now()))
    assert isinstance(moment, datetime)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# ---------------------------------------------------------------- jobs


def _job_page(session: Session, after: str | None, limit: int) -> list[_JobRow]:
    query = select(
        Job.id,
        Job.user_id,
        Job.tenant_id,
        Job.state,
        Job.number_of_images,
        Job.images_done,
        Job.price_per_image,
        Job.lease_expires_at,
        Job.results_deleted_at,
    )
    if after is not None:
        query = query.where(Job.id > after)
    rows = session.execute(query.order_by(Job.id).limit(limit))
    return [_JobRow(*row) for row in rows]


def _names(session: Session, user_ids: Iterable[int]) -> dict[int, str]:
    wanted = sorted(set(user_ids))
    if not wanted:
        return {}
    rows = session.execute(select(User.id, User.name).where(User.id.in_(wanted)))
    return {row.id: row.name for row in rows}


def _audit_jobs(
    session: Session,
    storage: ResultStorage,
    page: Sequence[_JobRow],
    audit: BooksAudit,
    require_terminal: bool,
    now: datetime,
) -> None:
    ids = [job.id for job in page]
    entries: dict[str, list[_Entry]] = defaultdict(list)
    for row in session.execute(
        select(
            LedgerEntry.job_id,
            LedgerEntry.user_id,
            LedgerEntry.kind,
            LedgerEntry.available_delta,
            LedgerEntry.held_delta,
        ).where(LedgerEntry.job_id.in_(ids))
    ):
        entries[row.job_id].append(
            _Entry(row.user_id, row.kind, row.available_delta, row.held_delta)
        )
    images: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for job_id, index, key in session.execute(
        select(JobImage.job_id, JobImage.index, JobImage.storage_key).where(
            JobImage.job_id.in_(ids)
        )
    ):
        images[job_id].append((index, key))
    names = _names(session, (job.user_id for job in page))
    for job in page:
        audit.jobs += 1
        audit.ledger_entries += len(entries[job.id])
        audit.images += len(images[job.id])
        user = names.get(job.user_id, f"#{job.user_id}")
        found = [
            *_job_state(job, require_terminal, now),
            *_job_ledger(job, entries[job.id]),
            *_job_images(job, images[job.id]),
            *_job_objects(storage, job, images[job.id], audit),
        ]
        if job.state in _LIVE:
            audit.live_jobs += 1
        for rule, detail in found:
            audit.add(Finding(rule, detail, job_id=job.id, user=user))


def _job_state(job: _JobRow, require_terminal: bool, now: datetime) -> list[tuple[Rule, str]]:
    if job.state in _TERMINAL:
        return []
    found: list[tuple[Rule, str]] = []
    if require_terminal:
        found.append((Rule.NOT_TERMINAL, f"still {job.state}"))
    if job.state == JobState.RUNNING.value and (
        job.lease_expires_at is None or job.lease_expires_at < now
    ):
        lapsed = job.lease_expires_at.isoformat() if job.lease_expires_at else "never set"
        found.append((Rule.LEASE_LAPSED, f"RUNNING, its lease lapsed at {lapsed}"))
    return found


def _malformed(entry: _Entry) -> bool:
    """Whether an entry's amounts break its kind's shape (see LedgerEntry)."""
    match entry.kind:
        case LedgerKind.HOLD.value:  # zero on a farm whose price is zero
            return not (entry.held >= 0 and entry.available == -entry.held)
        case LedgerKind.CAPTURE.value:
            return not (entry.held <= 0 and entry.available == 0)
        case LedgerKind.RELEASE.value:
            return not (entry.available > 0 and entry.held == -entry.available)
        case _:
            return True  # a grant names no job; no other kind exists


def _job_ledger(job: _JobRow, entries: Sequence[_Entry]) -> list[tuple[Rule, str]]:
    found: list[tuple[Rule, str]] = []
    by_kind: dict[str, list[_Entry]] = defaultdict(list)
    for entry in entries:
        by_kind[entry.kind].append(entry)
        if _malformed(entry):
            found.append(
                (
                    Rule.ENTRY_MALFORMED,
                    f"{entry.kind} entry moves {entry.available} available, {entry.held} held",
                )
            )
        if entry.user_id != job.user_id:
            found.append(
                (Rule.ENTRY_OTHER_USER, f"{entry.kind} entry on user #{entry.user_id}'s account")
            )
    holds = by_kind[LedgerKind.HOLD.value]
    captures = by_kind[LedgerKind.CAPTURE.value]
    releases = by_kind[LedgerKind.RELEASE.value]
    full_price = job.price_per_image * job.number_of_images
    # A free job answered from the cache writes no entry at all; every other job holds
    # once (zero on a farm whose price is zero) and captures once per delivered image.
    free_and_silent = job.price_per_image == 0 and not entries
    expected_holds = 0 if free_and_silent else 1
    if len(holds) != expected_holds:
        found.append((Rule.HOLD_COUNT, f"{len(holds)} holds, expected {expected_holds}"))
    for hold in holds:
        if hold.held != full_price:
            found.append((Rule.HOLD_AMOUNT, f"holds {hold.held}, the price is {full_price}"))
    expected_captures = 0 if free_and_silent else job.images_done
    if len(captures) != expected_captures:
        found.append(
            (
                Rule.CAPTURE_COUNT,
                f"{len(captures)} captures for {job.images_done} delivered images",
            )
        )
    wrong = [-capture.held for capture in captures if -capture.held != job.price_per_image]
    if wrong:
        found.append(
            (Rule.CAPTURE_AMOUNT, f"captures of {wrong}, the image price is {job.price_per_image}")
        )
    live = job.state in _LIVE
    if len(releases) > 1 or (live and releases):
        found.append((Rule.RELEASE_COUNT, f"{len(releases)} releases while {job.state}"))
    held = sum(entry.held for entry in entries)
    if not live and held != 0:
        what = "still held" if held > 0 else "settled beyond its holds"
        found.append((Rule.HOLD_OUTSTANDING, f"{abs(held)} {what} after it ended {job.state}"))
    return found


def _job_images(job: _JobRow, images: Sequence[tuple[int, str]]) -> list[tuple[Rule, str]]:
    found: list[tuple[Rule, str]] = []
    if len(images) != job.images_done:
        found.append(
            (Rule.IMAGE_COUNT, f"{len(images)} image records for {job.images_done} delivered")
        )
    counts = Counter(index for index, _ in images)
    twice = sorted(index for index, count in counts.items() if count > 1)
    outside = sorted(index for index in counts if not 0 <= index < job.number_of_images)
    if twice:
        found.append((Rule.IMAGE_INDEX, f"image indices recorded more than once: {twice}"))
    if outside:
        found.append(
            (Rule.IMAGE_INDEX, f"image indices outside 0..{job.number_of_images - 1}: {outside}")
        )
    return found


def job_prefix(tenant_id: int, job_id: str) -> str:
    """The storage prefix of a job's objects (see `image_storage_key`)."""
    return f"{tenant_id}/{job_id}/"


def _job_objects(
    storage: ResultStorage, job: _JobRow, images: Sequence[tuple[int, str]], audit: BooksAudit
) -> list[tuple[Rule, str]]:
    """Recorded images against the objects stored for the job (one listing per job)."""
    finished = job.state in _TERMINAL
    if not finished and not images:
        return []  # nothing recorded yet, and what is stored may still be on its way
    prefix = job_prefix(job.tenant_id, job.id)
    stored = set(storage.keys(prefix))
    audit.objects += len(stored)
    recorded = {key for _, key in images}
    found: list[tuple[Rule, str]] = []
    if job.results_deleted_at is None:
        for key in sorted(recorded):
            # A key outside the job's prefix (none is written so) is looked up on its own.
            present = key in stored if key.startswith(prefix) else key in set(storage.keys(key))
            if not present:
                found.append((Rule.OBJECT_MISSING, f"no object {key}"))
    if finished:
        # After its results were deleted, nothing at all should be left.
        kept = recorded if job.results_deleted_at is None else set()
        for key in sorted(stored - kept):
            why = "its results were deleted" if job.results_deleted_at else "no image record"
            found.append((Rule.OBJECT_ORPHANED, f"object {key} ({why})"))
    return found


# ---------------------------------------------------------------- users


def _user_page(session: Session, after: int | None, limit: int) -> list[tuple[int, str, int]]:
    query = select(User.id, User.name, User.balance)
    if after is not None:
        query = query.where(User.id > after)
    rows = session.execute(query.order_by(User.id).limit(limit))
    return [(row.id, row.name, row.balance) for row in rows]


@dataclass
class _Sums:
    available: int = 0
    granted: int = 0
    held: int = 0
    captured: int = 0
    released: int = 0
    live_held: int = 0
    stray: int = 0  # grants naming a job or other entries naming none, or bad grant amounts


def _audit_users(
    session: Session, users: Sequence[tuple[int, str, int]], audit: BooksAudit
) -> None:
    ids = [user_id for user_id, _, _ in users]
    sums: dict[int, _Sums] = defaultdict(_Sums)
    grant = LedgerEntry.kind == LedgerKind.GRANT.value
    # A grant names no job and adds a positive amount; every other entry names its job.
    out_of_shape = or_(
        and_(grant, LedgerEntry.job_id.is_not(None)),
        and_(grant, or_(LedgerEntry.held_delta != 0, LedgerEntry.available_delta <= 0)),
        and_(~grant, LedgerEntry.job_id.is_(None)),
    )
    rows = session.execute(
        select(
            LedgerEntry.user_id,
            LedgerEntry.kind,
            func.count(),
            func.coalesce(func.sum(LedgerEntry.available_delta), 0),
            func.coalesce(func.sum(LedgerEntry.held_delta), 0),
            func.coalesce(func.sum(case((out_of_shape, 1), else_=0)), 0),
        )
        .where(LedgerEntry.user_id.in_(ids))
        .group_by(LedgerEntry.user_id, LedgerEntry.kind)
    )
    for user_id, kind, count, available, held, stray in rows:
        if kind == LedgerKind.GRANT.value:
            audit.ledger_entries += int(count)  # a job's entries were counted with the job
        total = sums[user_id]
        total.available += int(available)
        total.stray += int(stray)
        match kind:
            case LedgerKind.GRANT.value:
                total.granted += int(available)
            case LedgerKind.HOLD.value:
                total.held += int(held)
            case LedgerKind.CAPTURE.value:
                total.captured += -int(held)
            case LedgerKind.RELEASE.value:
                total.released += int(available)
    for user_id, live_held in session.execute(
        select(LedgerEntry.user_id, func.coalesce(func.sum(LedgerEntry.held_delta), 0))
        .join(Job, Job.id == LedgerEntry.job_id)
        .where(LedgerEntry.user_id.in_(ids), Job.state.in_(_LIVE))
        .group_by(LedgerEntry.user_id)
    ):
        sums[user_id].live_held = int(live_held)
    usage: dict[int, tuple[int, int, int, int]] = {}
    for row in session.execute(
        select(
            UsageDay.user_id,
            func.coalesce(func.sum(UsageDay.granted), 0),
            func.coalesce(func.sum(UsageDay.held), 0),
            func.coalesce(func.sum(UsageDay.captured), 0),
            func.coalesce(func.sum(UsageDay.released), 0),
        )
        .where(UsageDay.user_id.in_(ids))
        .group_by(UsageDay.user_id)
    ):
        usage[row[0]] = (int(row[1]), int(row[2]), int(row[3]), int(row[4]))
    for user_id, name, balance in users:
        audit.users += 1
        total = sums[user_id]
        for rule, detail in _user_rules(balance, total, usage.get(user_id, (0, 0, 0, 0))):
            audit.add(Finding(rule, detail, user=name))


def _user_rules(
    balance: int, total: _Sums, usage: tuple[int, int, int, int]
) -> list[tuple[Rule, str]]:
    found: list[tuple[Rule, str]] = []
    if total.stray:
        found.append(
            (Rule.ENTRY_MALFORMED, f"{total.stray} grant(s) or jobless entries out of shape")
        )
    if balance != total.available:
        found.append(
            (Rule.BALANCE_LEDGER, f"balance {balance}, its ledger sums to {total.available}")
        )
    expected = total.granted - total.captured - total.live_held
    if balance != expected:
        found.append(
            (
                Rule.BALANCE_GRANTS,
                f"balance {balance}, grants {total.granted} - captures {total.captured} - "
                f"held by live jobs {total.live_held} = {expected}",
            )
        )
    ledger = (total.granted, total.held, total.captured, total.released)
    if usage != ledger:
        found.append(
            (
                Rule.USAGE_ROLLUP,
                "usage rollup granted/held/captured/released "
                f"{'/'.join(map(str, usage))}, ledger {'/'.join(map(str, ledger))}",
            )
        )
    return found
