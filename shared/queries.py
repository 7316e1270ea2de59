"""Read-side queries: jobs, the users' lines, queue positions, load, recovery candidates.

Nothing here changes a row (`shared/transitions.py` owns every change). No
query reads the whole queue: the fair order and a job's place in it come from
one row per active user (`user_queues`) plus indexed reads of single jobs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    bindparam,
    func,
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
    TENANT_MULTI_SQL,
    TENANT_SINGLE_SQL,
    TENANT_WAITING_SQL,
    TERMINAL_STATES,
    WAITING_SQL,
    Job,
    JobImage,
    JobState,
    Tenant,
    TenantQueue,
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
TENANT_WAITING: Final = text(f"({TENANT_WAITING_SQL})")

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
    return list(
        session.execute(
            select(TenantQueue.tenant_id)
            .where(TENANT_WAITING)
            .order_by(TenantQueue.first_vt, TenantQueue.first_created_at, TenantQueue.first_job_id)
            .limit(limit)
        ).scalars()
    )


@dataclass(frozen=True)
class QueuePlace:
    """Where a queued job stands: how many jobs start before it, and their work."""

    position: int
    work_ahead: float


def _others_sql(num: str, den: str, source: str = "") -> str:
    """The other tenants' jobs before the tenant-level virtual time num/den, as SQL.

    One row: strict counts and their work, the ties decided and their work, the ties
    left undecided (they need a job read), and the single-job tenants ahead and their
    work. Multi-job tenants are read only if their next job is not after num/den; a
    single-job tenant is ahead exactly when its job's (virtual time, age, id) is
    smaller: a range of one index. Mirrors `shared.fairshare.tenant_counts`.
    `source` names a one-row table that `num` and `den` come from, if any; it comes
    first in each FROM, as SQLite takes a CROSS JOIN's tables in the order written
    and must know the bound before it walks the index.
    """
    first = f"{source} CROSS JOIN" if source else ""
    return f"""
    SELECT multi.strict, multi.strict_work, multi.tied, multi.tied_work, multi.undecided,
           single.ahead, single.work
    FROM (
        SELECT
            COALESCE(SUM(strict), 0) AS strict,
            COALESCE(SUM(strict * CAST(work AS FLOAT) / size), 0) AS strict_work,
            COALESCE(SUM(tie_ahead), 0) AS tied,
            COALESCE(SUM(tie_ahead * CAST(work AS FLOAT) / size), 0) AS tied_work,
            COALESCE(SUM(CASE WHEN tie > 0 AND tie_ahead IS NULL THEN 1 ELSE 0 END), 0)
                AS undecided
        FROM (
            SELECT size, work, strict, tie,
                   CASE WHEN tie = 0 THEN 0
                        WHEN tie = 1 THEN CASE WHEN first_at < :born
                            OR (first_at = :born AND first_id < :job_id) THEN 1 ELSE 0 END
                        WHEN newest_at < :born THEN 1
                        WHEN oldest_at > :born THEN 0 END AS tie_ahead
            FROM (
                SELECT size, work, first_at, first_id, oldest_at, newest_at,
                       CASE WHEN scaled <= 0 THEN 0
                            WHEN (scaled + den - 1) / den - 1 >= size THEN size
                            ELSE (scaled + den - 1) / den - 1 END AS strict,
                       CASE WHEN scaled > 0 AND scaled % den = 0 AND scaled / den <= size
                            THEN scaled / den ELSE 0 END AS tie
                FROM (
                    SELECT t.waiting AS size, t.waiting_work AS work,
                           {num} * t.weight - t.in_flight * {den} AS scaled, {den} AS den,
                           t.first_created_at AS first_at, t.first_job_id AS first_id,
                           t.oldest_created_at AS oldest_at, t.newest_created_at AS newest_at
                    FROM {first} tenant_queues t
                    WHERE ({TENANT_MULTI_SQL}) AND t.first_vt <= CAST({num} AS FLOAT) / {den}
                      AND t.tenant_id <> :tenant
                ) AS scored
            ) AS counted
        ) AS decided
    ) AS multi
    CROSS JOIN (
        SELECT before.ahead + tied.ahead AS ahead, before.work + tied.work AS work
        FROM (
            SELECT COUNT(*) AS ahead, COALESCE(SUM(s.waiting_work), 0) AS work
            FROM {first} tenant_queues s
            WHERE ({TENANT_SINGLE_SQL}) AND s.first_vt < CAST({num} AS FLOAT) / {den}
              AND s.tenant_id <> :tenant
        ) AS before CROSS JOIN (
            SELECT COUNT(*) AS ahead, COALESCE(SUM(s.waiting_work), 0) AS work
            FROM {first} tenant_queues s
            WHERE ({TENANT_SINGLE_SQL}) AND s.first_vt = CAST({num} AS FLOAT) / {den}
              AND (s.first_created_at < :born
                   OR (s.first_created_at = :born AND s.first_job_id < :job_id))
              AND s.tenant_id <> :tenant
        ) AS tied
    ) AS single
    """  # noqa: S608 - only the module's own constants and column names are formatted in


# A waiting job's place in one statement, unless a tie in virtual time needs a job read.
# Its own tenant is counted from its users' lines, mirroring
# `shared.fairshare.ahead_in_tenant`; the property and database tests hold both to
# `fair_order`. Integer division of non-negative integers is the same on SQLite and
# PostgreSQL, and so is the rounding of a float division (weights are bounded so that
# distinct virtual times never meet as floats).
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
    -- Integer types throughout (PostgreSQL's SUM of a bigint is numeric, whose
    -- division does not truncate).
    SELECT CAST((SELECT in_flight FROM tenant_queues WHERE tenant_id = :tenant)
                + own.rank + inside.ahead AS BIGINT) AS num,
           CAST(own.tenant_weight AS BIGINT) AS den
    FROM own CROSS JOIN inside
),
others AS ({_others_sql("tenant_vt.num", "tenant_vt.den", "tenant_vt")})
SELECT own.rank, own.waiting, own.waiting_work,
       inside.ahead, inside.work, inside.open,
       tenant_vt.num, tenant_vt.den,
       others.*,
       (SELECT COUNT(*) FROM jobs WHERE ({RELEASED_SQL})),
       (SELECT COALESCE(SUM(work), 0) FROM jobs WHERE ({RELEASED_SQL}))
FROM own CROSS JOIN inside CROSS JOIN tenant_vt CROSS JOIN others
"""  # noqa: S608 - only the module's own constants are formatted in
_BINDS = (
    bindparam("tenant", type_=Integer),
    bindparam("born", type_=Job.created_at.type),
    bindparam("job_id", type_=String),
)
_PLACE = text(_PLACE_SQL).bindparams(
    bindparam("seq", type_=BigInteger), bindparam("user", type_=Integer), *_BINDS
)
_OTHERS = text(_others_sql(":numerator", ":denominator")).bindparams(
    bindparam("numerator", type_=BigInteger), bindparam("denominator", type_=BigInteger), *_BINDS
)
_UNDECIDED = text(
    f"""
    SELECT tenant_id, tie FROM (
        SELECT tenant_id, first_at, first_id, oldest_at, newest_at,
               CASE WHEN scaled > 0 AND scaled % den = 0 AND scaled / den <= size
                    THEN scaled / den ELSE 0 END AS tie
        FROM (
            SELECT t.tenant_id, t.waiting AS size,
                   :numerator * t.weight - t.in_flight * :denominator AS scaled,
                   :denominator AS den,
                   t.first_created_at AS first_at, t.first_job_id AS first_id,
                   t.oldest_created_at AS oldest_at, t.newest_created_at AS newest_at
            FROM tenant_queues t
            WHERE ({TENANT_MULTI_SQL}) AND t.first_vt <= CAST(:numerator AS FLOAT) / :denominator
              AND t.tenant_id <> :tenant
        ) AS scored
    ) AS counted
    WHERE tie > 1 AND NOT newest_at < :born AND NOT oldest_at > :born
    """  # noqa: S608 - only the module's own constants are formatted in
).bindparams(
    bindparam("numerator", type_=BigInteger),
    bindparam("denominator", type_=BigInteger),
    bindparam("tenant", type_=Integer),
    bindparam("born", type_=Job.created_at.type),
)


@dataclass(frozen=True)
class _Others:
    """The other tenants' jobs ahead (decided), and how many ties are left to decide."""

    ahead: Ahead
    undecided: int


def _others(row: Sequence[Any]) -> _Others:
    strict, strict_work, tied, tied_work, undecided, single, single_work = row
    return _Others(
        Ahead(
            jobs=int(strict) + int(tied) + int(single),
            work=work_units(1) * (float(strict_work) + float(tied_work) + float(single_work)),
        ),
        int(undecided),
    )


def queue_place(session: Session, job: Job) -> QueuePlace:
    """The job's place in the order the dispatcher follows (0: next), computed exactly.

    Released jobs go first, in release order; then the waiting jobs in fair-share
    order: those of the job's own tenant counted from its users' lines, those of
    every other tenant from the tenants' queues (a row per tenant whose next job is
    not after this one's virtual time; tenants with one job waiting are counted in
    an index), ties in virtual time decided by age. Usually one statement.
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
    row = session.execute(_PLACE, params).one()
    rank, waiting, waiting_work, inside_jobs, inside_work, inside_open, numerator, denominator = (
        row[:8]
    )
    released_count, released_work = row[-2:]
    others = _others(row[8:-2])
    queued = QueuedJob(job.id, job.tenant_id, job.user_id, job.created_at, job_work(job))
    resolve = lambda keys: resolve_keys(session, keys)  # noqa: E731
    if inside_open:
        # A tie inside the tenant needs a job read: count the tenant in Python.
        tenant_lines = load_lines(session, [job.tenant_id])
        inside = ahead_in_tenant(tenant_lines, queued, rank, resolve)
        numerator, denominator = tenant_virtual_time(tenant_lines, inside.jobs)
        others = _others(
            session.execute(
                _OTHERS,
                {
                    "tenant": job.tenant_id,
                    "born": job.created_at,
                    "job_id": job.id,
                    "numerator": numerator,
                    "denominator": denominator,
                },
            ).one()
        )
    else:
        own_mean = work_units(waiting_work) / waiting
        inside = Ahead(
            (rank - 1) + int(inside_jobs),
            (rank - 1) * own_mean + work_units(1) * float(inside_work),
        )
    tied = Ahead(0, 0.0)
    if others.undecided:
        ranks = {
            int(tenant_id): int(tie)
            for tenant_id, tie in session.execute(
                _UNDECIDED,
                {
                    "tenant": job.tenant_id,
                    "born": job.created_at,
                    "numerator": numerator,
                    "denominator": denominator,
                },
            ).all()
        }
        groups: dict[int, list[UserLine]] = defaultdict(list)
        for line in load_lines(session, list(ranks)):
            groups[line.tenant_id].append(line)
        tied = tied_jobs_ahead(
            [(groups[tenant], tie) for tenant, tie in ranks.items()], queued, resolve
        )
    return QueuePlace(
        position=int(released_count) + inside.jobs + others.ahead.jobs + tied.jobs,
        work_ahead=work_units(int(released_work)) + inside.work + others.ahead.work + tied.work,
    )


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
