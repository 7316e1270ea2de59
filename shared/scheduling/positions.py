"""A queued job's exact place in the release order, and its estimated wait.

Usually one statement: the job's own tenant counted from its users' lines, every
other tenant from the tenants' queues and the index of single-job tenants.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    bindparam,
    select,
    text,
)
from sqlalchemy.orm import Session

from shared.models import (
    RELEASED,
    RELEASED_SQL,
    TENANT_MULTI_SQL,
    TENANT_SINGLE_SQL,
    Job,
)
from shared.scheduling.fairshare import (
    Ahead,
    QueuedJob,
    UserLine,
    ahead_in_tenant,
    tenant_virtual_time,
    tied_jobs_ahead,
)
from shared.scheduling.order import job_work, load_lines, resolve_keys, work_units


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
    smaller: a range of one index. Mirrors `shared.scheduling.fairshare.tenant_counts`.
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
# `shared.scheduling.fairshare.ahead_in_tenant`; the property and database tests hold both to
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
    if not waiting:
        # The job left its line after it was read (each statement of a READ COMMITTED
        # transaction sees the newest commits): released meanwhile, or ended.
        session.refresh(job, ["released_at", "state"])
        if job.released_at is not None:
            return queue_place(session, job)
        return QueuePlace(0, 0.0)
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
