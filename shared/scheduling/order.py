"""The release order: the users' lines read from `user_queues` and merged in fair-share order.

No read here touches the whole queue: only the lines of the tenants that can supply
the next jobs, and indexed range reads of single users' waiting jobs.
"""

from __future__ import annotations

import typing
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from sqlalchemy import (
    Table,
    bindparam,
    func,
    select,
    tuple_,
)
from sqlalchemy.orm import Session

from shared.models import (
    ACTIVE_LINE,
    RELEASED,
    RUNNING,
    TENANT_WAITING,
    WAITING,
    Job,
    Tenant,
    TenantQueue,
    User,
    UserQueue,
)
from shared.scheduling.fairshare import (
    FairMerge,
    JobKey,
    QueuedJob,
    UserLine,
    pick_for_release,
    share_state,
)

ONE_MEGA_STEP: Final = 1024 * 1024  # the work unit: one 1024x1024 image at one step


def work_units(pixel_steps: int) -> float:
    """Pixel-steps in work units (1024x1024 images x steps)."""
    return pixel_steps / ONE_MEGA_STEP


def job_work(job: Job) -> float:
    """A job's size in work units."""
    return work_units(job.work)


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


_jobs = typing.cast(Table, Job.__table__).c
# Built once, as Core statements: the dispatcher runs them on every pass.
_NEXT_WAITING: Final = (
    select(_jobs.id, _jobs.created_at, _jobs.work, _jobs.queue_seq)
    .where(
        WAITING,
        _jobs.user_id == bindparam("line_user_id"),
        _jobs.queue_seq > bindparam("after_seq"),
    )
    .order_by(_jobs.queue_seq)
    .limit(bindparam("limit"))
)
_tenants = typing.cast(Table, TenantQueue.__table__).c
_FIRST_TENANTS: Final = (
    select(_tenants.tenant_id)
    .where(TENANT_WAITING)
    .order_by(_tenants.first_vt, _tenants.first_created_at, _tenants.first_job_id)
    .limit(bindparam("limit"))
)
_COUNT_RUNNING: Final = select(func.count()).select_from(Job.__table__).where(RUNNING)
_COUNT_RELEASED: Final = select(func.count()).select_from(Job.__table__).where(RELEASED)


def fetch_next_waiting(
    session: Session, line: UserLine, after: QueuedJob, limit: int
) -> list[QueuedJob]:
    """The user's waiting jobs after `after`, first in first out (an index range read)."""
    rows = session.execute(
        _NEXT_WAITING, {"line_user_id": line.user_id, "after_seq": after.seq, "limit": limit}
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
    return list(session.execute(_FIRST_TENANTS, {"limit": limit}).scalars())


@dataclass(frozen=True)
class Load:
    """How busy the farm is: jobs rendering, and jobs released but not yet claimed."""

    running: int
    released: int


def current_load(session: Session) -> Load:
    """Count RUNNING jobs and released, unclaimed QUEUED jobs (two partial-index counts)."""
    running = session.execute(_COUNT_RUNNING).scalar_one()
    released = session.execute(_COUNT_RELEASED).scalar_one()
    return Load(running=running, released=released)
