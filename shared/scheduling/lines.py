"""Users' lines and tenants' queues: the bookkeeping every job transition keeps exact.

A user's line (`user_queues`) counts its jobs waiting and in flight and numbers
the waiting ones consecutively in first-in, first-out order; a tenant's queue
(`tenant_queues`) sums its users' lines and names the tenant's next job in the
fair-share order. `shared.jobs.transitions` calls these in the same transaction as
the job change they follow, so both are right after any crash.

Locks, always in this order within a transaction: users' lines (by user id),
then job rows, then balances, then tenants' queues (by tenant id, when the
transaction ends: see `refresh_tenants`). Only the dispatcher holds more than
one line at a time, so transactions never wait on each other in a cycle.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import wraps
from typing import Any, Final, ParamSpec, TypeVar

from sqlalchemy import Float, Integer, Table, bindparam, case, cast, func, select, true, update
from sqlalchemy.orm import Session

from shared.models import ACTIVE_LINE, WAITING, Job, TenantQueue, User, UserQueue

P = ParamSpec("P")
R = TypeVar("R")
_PENDING: Final = "kolors_farm_tenants_to_refresh"
# A user's jobs get strictly increasing submission times, whatever the hosts' clocks do.
_TICK: Final = timedelta(microseconds=1)


@dataclass
class Line:
    """A user's line row, locked for this transaction, with the changes to write back."""

    user_id: int
    tenant_id: int
    waiting: int
    in_flight: int
    waiting_work: int
    head_seq: int
    last_created_at: datetime | None
    ends_moved: bool = False


# The hot statements are built once, as Core statements on the tables with bound
# parameters: building and caching an ORM statement per call cost more CPU than
# running it.
_USER_QUEUES: Final = typing.cast(Table, UserQueue.__table__)
_TENANT_QUEUES: Final = typing.cast(Table, TenantQueue.__table__)
_lines = _USER_QUEUES.c
_LINE_COLUMNS: Final = (
    _lines.user_id,
    _lines.tenant_id,
    _lines.waiting,
    _lines.in_flight,
    _lines.waiting_work,
    _lines.head_seq,
    _lines.last_created_at,
)
_LOCK_LINE: Final = (
    select(*_LINE_COLUMNS).where(_lines.user_id == bindparam("user_id")).with_for_update()
)
_LOCK_LINES: Final = (
    select(*_LINE_COLUMNS)
    .where(_lines.user_id.in_(bindparam("user_ids", expanding=True)))
    .order_by(_lines.user_id)
    .with_for_update()
)


def _line(row: Any) -> Line:
    return Line(
        row.user_id,
        row.tenant_id,
        row.waiting,
        row.in_flight,
        row.waiting_work,
        row.head_seq,
        row.last_created_at,
    )


def lock_line(session: Session, user_id: int) -> Line:
    """Lock the user's line (PostgreSQL row lock; SQLite's write lock is already held)."""
    return _line(session.execute(_LOCK_LINE, {"user_id": user_id}).one())


def lock_lines(session: Session, user_ids: Collection[int]) -> dict[int, Line]:
    """Lock several users' lines in one statement, in user id order (the lock order)."""
    # PostgreSQL locks the rows as the sort hands them over, so in user id order.
    rows = session.execute(_LOCK_LINES, {"user_ids": sorted(user_ids)})
    return {row.user_id: _line(row) for row in rows}


def lock_line_of_job(session: Session, job_id: str) -> Line | None:
    """Lock the line of the job's user; None if there is no such job."""
    user_id = session.execute(select(Job.user_id).where(Job.id == job_id)).scalar_one_or_none()
    return None if user_id is None else lock_line(session, user_id)


_jobs = typing.cast(Table, Job.__table__).c


def _waiting_job(seq: str, column: Any) -> Any:
    """A column of the line's waiting job numbered by parameter `seq`, as a scalar subquery."""
    return (
        select(column)
        .where(
            WAITING,
            _jobs.user_id == bindparam("line_user_id"),
            _jobs.queue_seq == bindparam(seq),
        )
        .scalar_subquery()
    )


_SAVE_COUNTS: Final = {
    "waiting": bindparam("line_waiting", type_=_lines.waiting.type),
    "in_flight": bindparam("line_in_flight", type_=_lines.in_flight.type),
    "waiting_work": bindparam("line_waiting_work", type_=_lines.waiting_work.type),
    "head_seq": bindparam("line_head_seq", type_=_lines.head_seq.type),
    "last_created_at": bindparam("line_last_created_at", type_=_lines.last_created_at.type),
}
_SAVE_LINE: Final = (
    update(_USER_QUEUES).where(_lines.user_id == bindparam("line_user_id")).values(**_SAVE_COUNTS)
)
# The ends' ids and ages are read by the same statement (one index probe each); with
# nobody waiting no job has those numbers, and they become NULL.
_SAVE_LINE_AND_ENDS: Final = _SAVE_LINE.values(
    head_job_id=_waiting_job("line_head", _jobs.id),
    head_created_at=_waiting_job("line_head", _jobs.created_at),
    tail_job_id=_waiting_job("line_tail", _jobs.id),
    tail_created_at=_waiting_job("line_tail", _jobs.created_at),
)


def save_line(session: Session, line: Line) -> None:
    """Write the line's counters back (its ends too, if they moved); its tenant follows."""
    values: dict[str, Any] = {
        "line_user_id": line.user_id,
        "line_waiting": line.waiting,
        "line_in_flight": line.in_flight,
        "line_waiting_work": line.waiting_work,
        "line_head_seq": line.head_seq,
        "line_last_created_at": line.last_created_at,
    }
    if line.ends_moved:
        values |= {"line_head": line.head_seq, "line_tail": line.head_seq + line.waiting - 1}
        session.execute(_SAVE_LINE_AND_ENDS, values)
    else:
        session.execute(_SAVE_LINE, values)
    tenant_changed(session, line.tenant_id)


def next_submission_time(line: Line, now: datetime) -> datetime:
    """A submission time after the user's previous one, whatever the hosts' clocks do."""
    if line.last_created_at is not None and now <= line.last_created_at:
        return line.last_created_at + _TICK
    return now


def join_line(line: Line, created_at: datetime, work: int) -> int:
    """Count a new job at the end of the user's line; returns its number in the line."""
    seq = line.head_seq + line.waiting
    line.waiting += 1
    line.waiting_work += work
    line.last_created_at = created_at
    line.ends_moved = True
    return seq


def note_submission(line: Line, created_at: datetime) -> None:
    """Count the submission time of a job that never waits (answered from the cache)."""
    line.last_created_at = created_at


def release_from_line(session: Session, line: Line, job_id: str, seq: int, work: int) -> bool:
    """A waiting job was released: it leaves the line and is in flight (see `leave_line`)."""
    moved_later = leave_line(session, line, job_id, seq, work)
    line.in_flight += 1
    return moved_later


def leave_for_good(
    session: Session, line: Line, job_id: str, seq: int | None, work: int, released: bool
) -> None:
    """A live job ended: out of the line if it was waiting, else no longer in flight."""
    if released:
        line.in_flight -= 1
    else:
        assert seq is not None, "a waiting job has its number in the line"
        leave_line(session, line, job_id, seq, work)


def return_to_line(
    session: Session, line: Line, job_id: str, created_at: datetime, work: int
) -> None:
    """A job in flight came back (a lost message, a lapsed lease): in line by its age."""
    line.in_flight -= 1
    enter_line(session, line, job_id, created_at, work)


def leave_line(session: Session, line: Line, job_id: str, seq: int, work: int) -> bool:
    """Close the gap a job left in its line (it is no longer waiting).

    The shorter side of the line moves by one, so taking the first or the last
    job costs nothing, and one from the middle at most half the line. Returns
    whether the jobs behind it moved forward (their numbers fell by one).
    """
    rank = seq - line.head_seq
    behind = line.waiting - 1 - rank
    if rank <= behind:
        if rank > 0:
            session.execute(
                update(Job)
                .where(
                    WAITING,
                    Job.user_id == line.user_id,
                    Job.queue_seq < seq,
                    Job.id != job_id,
                )
                .values(queue_seq=Job.queue_seq + 1)
            )
        line.head_seq += 1
    elif behind > 0:
        session.execute(
            update(Job)
            .where(WAITING, Job.user_id == line.user_id, Job.queue_seq > seq, Job.id != job_id)
            .values(queue_seq=Job.queue_seq - 1)
        )
    line.waiting -= 1
    line.waiting_work -= work
    line.ends_moved = True
    return rank > behind


def enter_line(session: Session, line: Line, job_id: str, created_at: datetime, work: int) -> None:
    """Put a job (already waiting, its number not yet set) in its first-in, first-out place."""
    rank = 0
    head = session.execute(
        select(Job.created_at, Job.id).where(
            WAITING, Job.user_id == line.user_id, Job.queue_seq == line.head_seq, Job.id != job_id
        )
    ).first()
    # A job coming back (a lapsed lease, a lost message) is usually older than the whole line.
    if line.waiting and head is not None and (created_at, job_id) > (head.created_at, head.id):
        rank = session.execute(
            select(func.count())
            .select_from(Job)
            .where(
                WAITING,
                Job.user_id == line.user_id,
                Job.id != job_id,
                (Job.created_at < created_at)
                | ((Job.created_at == created_at) & (Job.id < job_id)),
            )
        ).scalar_one()
    if rank <= line.waiting - rank:
        if rank > 0:
            session.execute(
                update(Job)
                .where(
                    WAITING,
                    Job.user_id == line.user_id,
                    Job.queue_seq < line.head_seq + rank,
                    Job.id != job_id,
                )
                .values(queue_seq=Job.queue_seq - 1)
            )
        line.head_seq -= 1
    else:
        session.execute(
            update(Job)
            .where(
                WAITING,
                Job.user_id == line.user_id,
                Job.queue_seq >= line.head_seq + rank,
                Job.id != job_id,
            )
            .values(queue_seq=Job.queue_seq + 1)
        )
    session.execute(update(Job).where(Job.id == job_id).values(queue_seq=line.head_seq + rank))
    line.waiting += 1
    line.waiting_work += work
    line.ends_moved = True


def tenant_changed(session: Session, tenant_id: int) -> None:
    """Note that a tenant's queue must be brought up to date before the transaction ends."""
    session.info.setdefault(_PENDING, set()).add(tenant_id)


def refresh_tenants(session: Session) -> None:
    """Bring every tenant noted in this transaction up to date, in tenant order (locks)."""
    for tenant_id in sorted(session.info.pop(_PENDING, set())):
        refresh_tenant(session, tenant_id)


def keeps_tenants(transition: Callable[P, R]) -> Callable[P, R]:
    """Decorate a transition taking the session first: its tenants are refreshed at its end."""

    @wraps(transition)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        result = transition(*args, **kwargs)
        session = args[0]
        assert isinstance(session, Session)
        refresh_tenants(session)
        return result

    return wrapper


def _refresh_tenant_statement() -> Any:
    """The UPDATE that recomputes the tenant `tenant_id` from its users' lines."""
    tenant_id = bindparam("queue_tenant_id", type_=Integer)
    users = User.__table__.c
    sums = (
        select(
            tenant_id.label("tenant_id"),
            func.coalesce(func.sum(_lines.waiting), 0).label("waiting"),
            func.coalesce(func.sum(_lines.in_flight), 0).label("in_flight"),
            func.coalesce(func.sum(_lines.waiting_work), 0).label("work"),
            func.min(_lines.head_created_at).label("oldest"),
            func.max(_lines.tail_created_at).label("newest"),
        )
        .where(_lines.tenant_id == tenant_id, ACTIVE_LINE)
        .subquery("line_sums")
    )
    first = (
        select(_lines.user_id, _lines.head_job_id, _lines.head_created_at)
        .join(User.__table__, users.id == _lines.user_id)
        .where(_lines.tenant_id == tenant_id, _lines.waiting > 0)
        .order_by(
            cast(_lines.in_flight + 1, Float) / users.weight,
            _lines.head_created_at,
            _lines.head_job_id,
        )
        .limit(1)
        .subquery("first_job")
    )
    # One row whether or not anyone waits: the sums LEFT JOIN the first job.
    now = (
        select(sums, first.c.user_id, first.c.head_job_id, first.c.head_created_at)
        .select_from(sums.outerjoin(first, true()))
        .subquery("tenant_now")
    )
    tenants = _TENANT_QUEUES
    waiting = now.c.waiting > 0
    return (
        update(tenants)
        .where(tenants.c.tenant_id == now.c.tenant_id)
        .values(
            waiting=now.c.waiting,
            in_flight=now.c.in_flight,
            waiting_work=now.c.work,
            first_vt=case(
                (waiting, cast(now.c.in_flight + 1, Float) / tenants.c.weight), else_=None
            ),
            first_user_id=now.c.user_id,
            first_job_id=now.c.head_job_id,
            first_created_at=now.c.head_created_at,
            oldest_created_at=case((waiting, now.c.oldest), else_=None),
            newest_created_at=case((waiting, now.c.newest), else_=None),
        )
    )


_LOCK_TENANT: Final = (
    select(_TENANT_QUEUES.c.tenant_id)
    .where(_TENANT_QUEUES.c.tenant_id == bindparam("tenant_id"))
    .with_for_update()
)
_REFRESH_TENANT: Final = _refresh_tenant_statement()


def refresh_tenant(session: Session, tenant_id: int) -> None:
    """Recompute a tenant's queue from its users' lines (one row per active user).

    Its next job is its users' first jobs' minimum by (in_flight + 1) / weight, then
    age: the order `shared.scheduling.fairshare` gives a tenant's users. Two
    statements: the row lock, then one UPDATE computing everything else.
    """
    # The lock is a statement of its own: under READ COMMITTED the UPDATE's snapshot
    # is taken after the lock is granted, so it sees the lines of a refresh that
    # committed while this one waited (an UPDATE that waits re-reads only its row).
    session.execute(_LOCK_TENANT, {"tenant_id": tenant_id}).one()
    session.execute(_REFRESH_TENANT, {"queue_tenant_id": tenant_id})
