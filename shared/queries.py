"""Read-side queries: jobs, the users' lines, queue positions, load, recovery candidates.

Nothing here changes a row (`shared/transitions.py` owns every change). No
query reads the whole queue: the fair order and a job's place in it come from
one row per active user (`user_queues`) plus indexed reads of single jobs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    case,
    cast,
    func,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.orm import Session

from shared.accounts import Principal
from shared.errors import JobNotFound, ResultsExpired
from shared.fairshare import (
    Ahead,
    FairMerge,
    JobKey,
    QueuedJob,
    UserLine,
    ahead_in_tenant,
    pick_for_release,
    share_state,
    tenant_virtual_time,
    tied_jobs_ahead,
)
from shared.models import (
    ACTIVE_LINE_SQL,
    LIVE_DEADLINE_SQL,
    RELEASED_SQL,
    RETAINED_SQL,
    RUNNING_SQL,
    TERMINAL_STATES,
    WAITING_SQL,
    Job,
    JobImage,
    JobState,
    Tenant,
    User,
    UserQueue,
    utcnow,
)

# Literal predicates (not bound parameters), so SQLite and PostgreSQL both match them
# to the partial indexes of the same text; parenthesized, as text is not grouped.
WAITING: Final = text(f"({WAITING_SQL})")
RELEASED: Final = text(f"({RELEASED_SQL})")
RUNNING: Final = text(f"({RUNNING_SQL})")
ACTIVE_LINE: Final = text(f"({ACTIVE_LINE_SQL})")
RETAINED: Final = text(f"({RETAINED_SQL})")
LIVE_DEADLINE: Final = text(f"({LIVE_DEADLINE_SQL})")

ONE_MEGA_STEP: Final = 1024 * 1024  # the work unit: one 1024x1024 image at one step

PUBLIC_STATUS: Final = {
    JobState.QUEUED: "QUEUED",
    JobState.RUNNING: "PROCESSING",
    JobState.COMPLETED: "COMPLETED",
    JobState.FAILED: "FAILED",
    JobState.CANCELLED: "FAILED",
}


def work_units(pixel_steps: int) -> float:
    """Pixel-steps in work units (1024x1024 images x steps)."""
    return pixel_steps / ONE_MEGA_STEP


def job_work(job: Job) -> float:
    """A job's size in work units."""
    return work_units(job.work)


def get_job(session: Session, principal: Principal, job_id: str) -> Job:
    """A job of the caller's tenant; any other job is indistinguishable from a missing one."""
    job = session.execute(
        select(Job).where(Job.id == job_id, Job.tenant_id == principal.tenant_id)
    ).scalar_one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def job_state(session: Session, job_id: str) -> JobState:
    """A job's current state, read fresh."""
    return JobState(session.execute(select(Job.state).where(Job.id == job_id)).scalar_one())


def public_status(job: Job) -> str:
    """Segmind's four states: QUEUED, PROCESSING, COMPLETED, FAILED."""
    return PUBLIC_STATUS[JobState(job.state)]


def results_expired(job: Job, now: datetime | None = None) -> bool:
    """Whether the job's results are past their retention (served never again)."""
    if job.results_deleted_at is not None:
        return True
    return job.expires_at is not None and job.expires_at <= (now or utcnow())


def ensure_results_retained(job: Job) -> None:
    """ResultsExpired unless the job's results may still be served."""
    if results_expired(job):
        expired = job.expires_at.isoformat() if job.expires_at else "earlier"
        raise ResultsExpired(
            f"The results of request {job.id} expired at {expired} and were deleted"
        )


def expired_results(session: Session, limit: int) -> dict[str, list[str]]:
    """Up to `limit` ended jobs past retention whose results still exist, with their keys."""
    job_ids = list(
        session.scalars(
            select(Job.id)
            .where(
                RETAINED,
                Job.expires_at <= utcnow(),
                Job.state.in_([s.value for s in TERMINAL_STATES]),
            )
            .order_by(Job.expires_at)
            .limit(limit)
        )
    )
    keys: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
    for job_id, key in session.execute(
        select(JobImage.job_id, JobImage.storage_key).where(JobImage.job_id.in_(job_ids))
    ):
        keys[job_id].append(key)
    return keys


# ---------------------------------------------------------------- lines and the fair order


_LINES = (
    select(
        UserQueue.user_id,
        UserQueue.tenant_id,
        User.weight,
        Tenant.weight.label("tenant_weight"),
        UserQueue.waiting,
        UserQueue.in_flight,
        UserQueue.waiting_work,
        UserQueue.head_seq,
        UserQueue.head_job_id,
        UserQueue.head_created_at,
        UserQueue.tail_job_id,
        UserQueue.tail_created_at,
    )
    .join(User, User.id == UserQueue.user_id)
    .join(Tenant, Tenant.id == UserQueue.tenant_id)
    .where(ACTIVE_LINE)
)
_LINES_OF_TENANTS = _LINES.where(UserQueue.tenant_id.in_(bindparam("tenants", expanding=True)))


def load_lines(session: Session, tenants: Collection[int] | None = None) -> list[UserLine]:
    """The users with jobs waiting or in flight (of `tenants`, or all): one row each."""
    if tenants is None:
        rows = session.execute(_LINES).all()
    else:
        rows = session.execute(_LINES_OF_TENANTS, {"tenants": list(tenants)}).all()
    lines = []
    for (
        user_id,
        tenant_id,
        weight,
        tenant_weight,
        waiting,
        in_flight,
        waiting_work,
        head_seq,
        head_id,
        head_at,
        tail_id,
        tail_at,
    ) in rows:
        head = tail = None
        if waiting:  # a line with jobs waiting always names its first and last
            assert head_id and head_at and tail_id and tail_at
            head = QueuedJob(head_id, tenant_id, user_id, head_at, 0.0, head_seq)
            tail = QueuedJob(tail_id, tenant_id, user_id, tail_at, 0.0, head_seq + waiting - 1)
        lines.append(
            UserLine(
                user_id,
                tenant_id,
                weight,
                tenant_weight,
                waiting,
                in_flight,
                work_units(waiting_work),
                head,
                tail,
                head_seq,
            )
        )
    return lines


def fetch_next_waiting(
    session: Session, line: UserLine, after: QueuedJob, limit: int
) -> list[QueuedJob]:
    """The user's waiting jobs after `after`, first in first out (an index range read)."""
    rows = session.execute(
        select(Job.id, Job.created_at, Job.work, Job.queue_seq)
        .where(WAITING, Job.user_id == line.user_id, Job.queue_seq > after.seq)
        .order_by(Job.queue_seq)
        .limit(limit)
    ).all()
    return [
        QueuedJob(
            job_id=row.id,
            tenant_id=line.tenant_id,
            user_id=line.user_id,
            created_at=row.created_at,
            work=work_units(row.work),
            seq=row.queue_seq,
        )
        for row in rows
    ]


def resolve_keys(
    session: Session, asked: list[tuple[UserLine, int]]
) -> dict[tuple[int, int], JobKey]:
    """The (created_at, id) of each user's k-th waiting job asked for, in one indexed read."""
    wanted = {(line.user_id, line.head_seq + k - 1): (line.user_id, k) for line, k in asked}
    rows = session.execute(
        select(Job.user_id, Job.queue_seq, Job.created_at, Job.id).where(
            WAITING, tuple_(Job.user_id, Job.queue_seq).in_(list(wanted))
        )
    ).all()
    return {wanted[(row.user_id, row.queue_seq)]: (row.created_at, row.id) for row in rows}


def next_in_fair_order(session: Session, slots: int, max_running_per_user: int) -> list[QueuedJob]:
    """The next `slots` waiting jobs the fair-share policy releases, skipping capped users.

    Only tenants whose first job is among the first `slots` first jobs can supply
    any of the first `slots` jobs, so only their lines are read (more while capped
    users are skipped).
    """
    if slots <= 0:
        return []
    wanted = slots + 8  # a margin: candidates are ranked in floating point
    while True:
        tenants = _first_tenants(session, wanted)
        lines = load_lines(session, tenants)
        merge = FairMerge(
            lines, lambda line, after, limit: fetch_next_waiting(session, line, after, limit)
        )
        picked = pick_for_release(merge, slots, share_state(lines), max_running_per_user)
        if len(picked) >= slots or len(tenants) < wanted:
            return picked
        wanted *= 4  # capped users were skipped: look further


def _first_tenants(session: Session, limit: int) -> list[int]:
    """The `limit` tenants whose next jobs come first: by tenant virtual time, then age."""
    user_vt = cast(UserQueue.in_flight + 1, Float) / User.weight
    ranked = (
        select(
            UserQueue.tenant_id,
            UserQueue.waiting,
            UserQueue.head_created_at,
            UserQueue.head_job_id,
            func.row_number()
            .over(
                partition_by=UserQueue.tenant_id,
                order_by=(
                    (UserQueue.waiting == 0),
                    user_vt,
                    UserQueue.head_created_at,
                    UserQueue.head_job_id,
                ),
            )
            .label("place"),
            func.sum(UserQueue.in_flight).over(partition_by=UserQueue.tenant_id).label("active"),
        )
        .join(User, User.id == UserQueue.user_id)
        .where(ACTIVE_LINE)
        .subquery()
    )
    tenant_vt = cast(ranked.c.active + 1, Float) / Tenant.weight
    return list(
        session.execute(
            select(ranked.c.tenant_id)
            .join(Tenant, Tenant.id == ranked.c.tenant_id)
            .where(ranked.c.place == 1, ranked.c.waiting > 0)
            .order_by(tenant_vt, ranked.c.head_created_at, ranked.c.head_job_id)
            .limit(limit)
        ).scalars()
    )


@dataclass(frozen=True)
class QueuePlace:
    """Where a queued job stands: how many jobs start before it, and their work."""

    position: int
    work_ahead: float


# A waiting job's place in one statement, for the common case where every tie in virtual
# time is decided by a line's first or last job (or by all of a tenant's jobs being
# older or younger). Mirrors `shared.fairshare.ahead_in_tenant` and `tenant_counts`;
# the property and database tests hold both to `fair_order`. Integer division of
# non-negative integers is the same on SQLite and PostgreSQL.
_PLACE_SQL = f"""
WITH own AS (
    SELECT uq.in_flight + (:seq - uq.head_seq + 1) AS num, u.weight AS den,
           :seq - uq.head_seq + 1 AS rank, uq.waiting_work, uq.waiting, t.weight AS tenant_weight
    FROM user_queues uq JOIN users u ON u.id = uq.user_id JOIN tenants t ON t.id = uq.tenant_id
    WHERE uq.user_id = :user
),
mates AS (
    SELECT uq.waiting AS size, uq.waiting_work AS work,
           own.num * u.weight - uq.in_flight * own.den AS scaled, own.den AS den,
           uq.head_created_at AS head_at, uq.head_job_id AS head_id,
           uq.tail_created_at AS tail_at, uq.tail_job_id AS tail_id
    FROM user_queues uq JOIN users u ON u.id = uq.user_id CROSS JOIN own
    WHERE uq.tenant_id = :tenant AND uq.user_id <> :user AND uq.waiting > 0
),
mates_counted AS (
    SELECT size, work,
           CASE WHEN scaled <= 0 THEN 0
                WHEN (scaled + den - 1) / den - 1 >= size THEN size
                ELSE (scaled + den - 1) / den - 1 END AS strict,
           CASE WHEN scaled > 0 AND scaled % den = 0 AND scaled / den <= size
                THEN scaled / den ELSE 0 END AS tie,
           head_at, head_id, tail_at, tail_id
    FROM mates
),
mates_decided AS (
    SELECT size, work, strict, tie,
           CASE WHEN tie = 0 THEN 0
                WHEN tie = 1 THEN CASE WHEN head_at < :born
                    OR (head_at = :born AND head_id < :job_id) THEN 1 ELSE 0 END
                WHEN tie = size THEN CASE WHEN tail_at < :born
                    OR (tail_at = :born AND tail_id < :job_id) THEN 1 ELSE 0 END
                WHEN tail_at < :born THEN 1
                WHEN head_at > :born THEN 0 END AS tie_ahead
    FROM mates_counted
),
inside AS (
    SELECT COALESCE(SUM(strict + COALESCE(tie_ahead, 0)), 0) AS ahead,
           COALESCE(SUM((strict + COALESCE(tie_ahead, 0)) * CAST(work AS FLOAT) / size), 0)
               AS work,
           COALESCE(SUM(CASE WHEN tie > 0 AND tie_ahead IS NULL THEN 1 ELSE 0 END), 0) AS open
    FROM mates_decided
),
tenant_vt AS (
    SELECT (SELECT COALESCE(SUM(in_flight), 0) FROM user_queues
            WHERE tenant_id = :tenant AND ({ACTIVE_LINE_SQL}))
           + own.rank + inside.ahead AS num,
           own.tenant_weight AS den
    FROM own CROSS JOIN inside
),
others AS (
    SELECT tenant_vt.num * MAX(t.weight) - SUM(uq.in_flight) * tenant_vt.den AS scaled,
           tenant_vt.den AS den, SUM(uq.waiting) AS size, SUM(uq.waiting_work) AS work
    FROM user_queues uq JOIN tenants t ON t.id = uq.tenant_id CROSS JOIN tenant_vt
    WHERE ({ACTIVE_LINE_SQL}) AND uq.tenant_id <> :tenant
    GROUP BY uq.tenant_id, tenant_vt.num, tenant_vt.den
),
others_counted AS (
    SELECT size, work,
           CASE WHEN scaled <= 0 THEN 0
                WHEN (scaled + den - 1) / den - 1 >= size THEN size
                ELSE (scaled + den - 1) / den - 1 END AS strict,
           CASE WHEN scaled > 0 AND scaled % den = 0 AND scaled / den <= size
                THEN 1 ELSE 0 END AS tied
    FROM others WHERE size > 0
)
SELECT own.rank, own.waiting, own.waiting_work,
       inside.ahead, inside.work, inside.open,
       tenant_vt.num, tenant_vt.den,
       (SELECT COALESCE(SUM(strict), 0) FROM others_counted),
       (SELECT COALESCE(SUM(strict * CAST(work AS FLOAT) / size), 0) FROM others_counted),
       (SELECT COALESCE(SUM(tied), 0) FROM others_counted),
       (SELECT COUNT(*) FROM jobs WHERE ({RELEASED_SQL})),
       (SELECT COALESCE(SUM(work), 0) FROM jobs WHERE ({RELEASED_SQL}))
FROM own CROSS JOIN inside CROSS JOIN tenant_vt
"""  # noqa: S608 - only the module's own predicate constants are formatted in
_PLACE = text(_PLACE_SQL).bindparams(
    bindparam("seq", type_=BigInteger),
    bindparam("user", type_=Integer),
    bindparam("tenant", type_=Integer),
    bindparam("born", type_=Job.created_at.type),
    bindparam("job_id", type_=String),
)


def queue_place(session: Session, job: Job) -> QueuePlace:
    """The job's place in the order the dispatcher follows (0: next), computed exactly.

    Released jobs go first, in release order; then the waiting jobs in fair-share
    order: those of the job's own tenant counted from its users' lines, those of
    every other tenant summed from the lines' counts (one row per user, whatever
    the depth), ties in virtual time decided by age. Usually one statement; ties
    that need a job read take a few more.
    """
    if job.released_at is not None:
        released = session.execute(select(Job.id, Job.released_at, Job.work).where(RELEASED)).all()
        first = [row for row in released if (row.released_at, row.id) < (job.released_at, job.id)]
        return QueuePlace(len(first), sum(work_units(row.work) for row in first))
    params = {
        "seq": job.queue_seq,
        "user": job.user_id,
        "tenant": job.tenant_id,
        "born": job.created_at,
        "job_id": job.id,
    }
    (
        rank,
        waiting,
        waiting_work,
        inside_jobs,
        inside_work,
        inside_open,
        numerator,
        denominator,
        others_jobs,
        others_work,
        others_tied,
        released_count,
        released_work,
    ) = session.execute(_PLACE, params).one()
    queued = QueuedJob(job.id, job.tenant_id, job.user_id, job.created_at, job_work(job))
    if inside_open:
        # A tie inside the tenant needs a job read: count the tenant in Python.
        resolve = lambda keys: resolve_keys(session, keys)  # noqa: E731
        tenant_lines = load_lines(session, [job.tenant_id])
        inside = ahead_in_tenant(tenant_lines, queued, rank, resolve)
        numerator, denominator = tenant_virtual_time(tenant_lines, inside.jobs)
        across, tied_ranks = _other_tenants_ahead(session, job, numerator, denominator)
    else:
        own_mean = work_units(waiting_work) / waiting
        inside = Ahead(
            (rank - 1) + int(inside_jobs),
            (rank - 1) * own_mean + work_units(1) * float(inside_work),
        )
        across = Ahead(int(others_jobs), work_units(1) * float(others_work))
        tied_ranks = {}
        if others_tied:
            across, tied_ranks = _other_tenants_ahead(session, job, numerator, denominator)
    tied = Ahead(0, 0.0)
    if tied_ranks:
        groups: dict[int, list[UserLine]] = defaultdict(list)
        for line in load_lines(session, list(tied_ranks)):
            groups[line.tenant_id].append(line)
        ties = [(groups[tenant], rank) for tenant, rank in tied_ranks.items()]
        tied = tied_jobs_ahead(ties, queued, lambda keys: resolve_keys(session, keys))
    return QueuePlace(
        position=int(released_count) + inside.jobs + across.jobs + tied.jobs,
        work_ahead=work_units(int(released_work)) + inside.work + across.work + tied.work,
    )


def _other_tenants_statements() -> tuple[Select[Any], Select[Any], Select[Any]]:
    """The aggregates `_other_tenants_ahead` runs, built once (parameters bound per call).

    The first sums the jobs strictly ahead in every other tenant and counts the ties
    (a tenant whose k-th job has the same virtual time); only when there are some
    does the second decide them from the tenants' first and last jobs, and the
    third list the ones it could not decide.
    """
    p = bindparam("numerator", type_=BigInteger)
    q = bindparam("denominator", type_=BigInteger)
    born = bindparam("born", type_=Job.created_at.type)
    job_id = bindparam("job_id", type_=String)
    other_tenants = (ACTIVE_LINE, UserQueue.tenant_id != bindparam("tenant", type_=Integer))
    scaled = p * func.max(Tenant.weight) - func.sum(UserQueue.in_flight) * q
    counts = (
        select(
            scaled.label("scaled"),
            func.sum(UserQueue.waiting).label("size"),
            func.sum(UserQueue.waiting_work).label("work"),
        )
        .join(Tenant, Tenant.id == UserQueue.tenant_id)
        .where(*other_tenants)
        .group_by(UserQueue.tenant_id)
        .subquery()
    )

    def strict_and_tie(c: Any) -> tuple[Any, Any]:
        after = (c.scaled + q - 1) // q - 1  # ceil(scaled / q) - 1, for scaled > 0
        strict = case((c.scaled <= 0, 0), (after >= c.size, c.size), else_=after)
        tie = case(
            (and_(c.scaled > 0, c.scaled % q == 0, c.scaled // q <= c.size), c.scaled // q),
            else_=0,
        )
        return strict, tie

    strict, tie = strict_and_tie(counts.c)
    totals = select(
        func.coalesce(func.sum(strict), 0),
        func.coalesce(func.sum(strict * cast(counts.c.work, Float) / counts.c.size), 0.0),
        func.coalesce(func.sum(case((tie > 0, 1), else_=0)), 0),
    ).where(counts.c.size > 0)
    ends = (
        select(
            UserQueue.tenant_id.label("tenant_id"),
            scaled.label("scaled"),
            func.sum(UserQueue.waiting).label("size"),
            func.sum(UserQueue.waiting_work).label("work"),
            func.sum(case((UserQueue.waiting > 0, 1), else_=0)).label("users"),
            func.min(UserQueue.head_created_at).label("head_at"),
            func.min(UserQueue.head_job_id).label("head_id"),
            func.max(UserQueue.tail_created_at).label("tail_at"),
            func.max(UserQueue.tail_job_id).label("tail_id"),
        )
        .join(Tenant, Tenant.id == UserQueue.tenant_id)
        .where(*other_tenants)
        .group_by(UserQueue.tenant_id)
        .subquery()
    )
    c = ends.c
    _, tie = strict_and_tie(c)
    head_older = or_(c.head_at < born, and_(c.head_at == born, c.head_id < job_id))
    tail_older = or_(c.tail_at < born, and_(c.tail_at == born, c.tail_id < job_id))
    single = c.users == 1
    # The tied job is the one line's first or last job, or every waiting job of the
    # tenant is older (or younger) than this one; else NULL (undecided).
    tie_ahead = case(
        (and_(single, tie == 1), case((head_older, 1), else_=0)),
        (and_(single, tie == c.size), case((tail_older, 1), else_=0)),
        (c.tail_at < born, 1),
        (c.head_at > born, 0),
        else_=None,
    )
    tied = and_(c.size > 0, tie > 0)
    decided = select(
        func.coalesce(func.sum(tie_ahead), 0),
        func.coalesce(func.sum(tie_ahead * cast(c.work, Float) / c.size), 0.0),
        func.coalesce(func.sum(case((tie_ahead.is_(None), 1), else_=0)), 0),
    ).where(tied)
    undecided = select(c.tenant_id, tie).where(tied, tie_ahead.is_(None))
    return totals, decided, undecided


_OTHER_TENANTS, _DECIDED_TIES, _UNDECIDED_TIES = _other_tenants_statements()


def _other_tenants_ahead(
    session: Session, job: Job, numerator: int, denominator: int
) -> tuple[Ahead, dict[int, int]]:
    """Jobs of the other tenants before the tenant-level virtual time numerator/denominator.

    Aggregates over the active lines (one row per user). Ties that a tenant's one
    line, or its first and last jobs, decide are counted here; the others come back
    as {tenant: tied rank} for `tied_jobs_ahead`.
    """
    params = {
        "tenant": job.tenant_id,
        "numerator": numerator,
        "denominator": denominator,
        "born": job.created_at,
        "job_id": job.id,
    }
    jobs, work, ties = session.execute(_OTHER_TENANTS, params).one()
    if not ties:
        return Ahead(jobs=int(jobs), work=work_units(1) * float(work)), {}
    tied_jobs, tied_work, open_ties = session.execute(_DECIDED_TIES, params).one()
    ahead = Ahead(
        jobs=int(jobs) + int(tied_jobs), work=work_units(1) * (float(work) + float(tied_work))
    )
    if not open_ties:
        return ahead, {}
    return ahead, {
        int(tenant_id): int(rank)
        for tenant_id, rank in session.execute(_UNDECIDED_TIES, params).all()
    }


def estimate_wait_seconds(
    work_before: float, own_work: float, seconds_per_unit: list[float], workers: int
) -> float | None:
    """Seconds until a job finishes: the work before it spread over the workers, then its own.

    None while no worker has measured its speed yet.
    """
    if not seconds_per_unit:
        return None
    speed = sum(seconds_per_unit) / len(seconds_per_unit)
    return (work_before / max(1, workers) + own_work) * speed


# ---------------------------------------------------------------- load and recovery


@dataclass(frozen=True)
class Load:
    """How busy the farm is: jobs rendering, and jobs released but not yet claimed."""

    running: int
    released: int


def current_load(session: Session) -> Load:
    """Count RUNNING jobs and released, unclaimed QUEUED jobs (two partial-index counts)."""
    running = session.execute(select(func.count()).select_from(Job).where(RUNNING)).scalar_one()
    released = session.execute(select(func.count()).select_from(Job).where(RELEASED)).scalar_one()
    return Load(running=running, released=released)


def stale_releases(session: Session, older_than: datetime, limit: int) -> list[str]:
    """Released, unclaimed jobs released before `older_than`, oldest first."""
    if limit <= 0:
        return []
    return list(
        session.execute(
            select(Job.id)
            .where(RELEASED, Job.released_at < older_than, Job.cancel_requested.is_(False))
            .order_by(Job.released_at, Job.id)
            .limit(limit)
        ).scalars()
    )


def expired_leases(session: Session, now: datetime, limit: int) -> list[str]:
    """RUNNING jobs whose lease lapsed before `now` (their worker stopped renewing)."""
    return list(
        session.execute(
            select(Job.id)
            .where(RUNNING, Job.lease_expires_at < now)
            .order_by(Job.lease_expires_at)
            .limit(limit)
        ).scalars()
    )


def past_deadline(session: Session, now: datetime, limit: int) -> list[str]:
    """QUEUED jobs whose deadline passed."""
    return list(
        session.execute(
            select(Job.id)
            .where(
                LIVE_DEADLINE,
                Job.state == JobState.QUEUED.value,
                Job.deadline_at < now,
            )
            .order_by(Job.deadline_at)
            .limit(limit)
        ).scalars()
    )
