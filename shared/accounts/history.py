"""A tenant's request history and daily credit usage, read in keyset pages over indexes.

Nothing here reads a whole table: a page of requests is one range read of
ix_jobs_tenant_history (or ix_jobs_tenant_state_history per state) below the
cursor, and a page of usage one range read of ix_usage_days_tenant_day above it.
Cursors are opaque to clients (URL-safe base64 of the last row's sort key); a
cursor that does not decode is a 400 naming the `cursor` parameter.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

from pydantic import BaseModel, Field
from sqlalchemy import Select, select, tuple_
from sqlalchemy.orm import Session, selectinload

from shared.accounts.pricing import CREDITS_PATTERN, Credits, format_credits
from shared.errors import InvalidParams
from shared.models import Job, JobState, Tenant, UsageDay, User

# Public states and the job states each stands for; FAILED includes cancelled requests.
PUBLIC_STATES: Final[dict[str, tuple[JobState, ...]]] = {
    "QUEUED": (JobState.QUEUED,),
    "PROCESSING": (JobState.RUNNING,),
    "COMPLETED": (JobState.COMPLETED,),
    "FAILED": (JobState.FAILED, JobState.CANCELLED),
}
MAX_USAGE_DAYS: Final = 366


@dataclass(frozen=True)
class HistoryKey:
    """Where a page of requests ends: the last request's submission time and id."""

    created_at: datetime
    job_id: str


@dataclass(frozen=True)
class UsageKey:
    """Where a page of usage ends: the last row's day and user."""

    day: date
    user_id: int


# Not the API's body of a page of requests (RequestPage): each summary there carries image
# links, which only the layers above sign, so the rows go up and the body is built there.
@dataclass(frozen=True)
class JobPage:
    """Requests newest first (their images loaded), the users' names, and the next key."""

    jobs: list[Job]
    user_names: dict[int, str]
    next_key: HistoryKey | None


# The API serves these bodies as the domain builds them (JSON, or CSV of the same rows).
class UsageRow(BaseModel):
    """One user's credit movements on one UTC day."""

    day: date
    user: str
    granted: Credits = Field(pattern=CREDITS_PATTERN)
    held: Credits = Field(pattern=CREDITS_PATTERN)
    captured: Credits = Field(pattern=CREDITS_PATTERN)
    released: Credits = Field(pattern=CREDITS_PATTERN)


class UsagePage(BaseModel):
    """A page of the tenant's daily usage, by day then user."""

    usage: list[UsageRow]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: done.")


def bad_cursor() -> InvalidParams:
    """The 400 for a cursor no route handed out."""
    return InvalidParams.single("cursor", "cursor", "is not a cursor this route handed out")


def encode_cursor(payload: dict[str, Any]) -> str:
    """An opaque cursor holding `payload` (URL-safe base64 of its JSON)."""
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> dict[str, Any]:
    """The payload of a cursor `encode_cursor` made; `bad_cursor()` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise bad_cursor() from exc
    if not isinstance(payload, dict):
        raise bad_cursor()
    return payload


def encode_history_cursor(key: HistoryKey) -> str:
    """An opaque cursor for the requests after `key`."""
    return encode_cursor({"t": key.created_at.isoformat(), "id": key.job_id})


def decode_history_cursor(cursor: str) -> HistoryKey:
    """The key a history cursor holds; InvalidParams (400, `cursor`) if it holds none."""
    payload = decode_cursor(cursor)
    try:
        created_at = datetime.fromisoformat(payload["t"])
        job_id = payload["id"]
        if created_at.tzinfo is None:
            raise ValueError("a cursor's time is in UTC")
        created_at = created_at.astimezone(UTC)  # overflows near year 1 or 9999
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise bad_cursor() from exc
    if not isinstance(job_id, str):
        raise bad_cursor()
    return HistoryKey(created_at, job_id)


def encode_usage_cursor(key: UsageKey) -> str:
    """An opaque cursor for the usage rows after `key`."""
    return encode_cursor({"d": key.day.isoformat(), "u": key.user_id})


def decode_usage_cursor(cursor: str) -> UsageKey:
    """The key a usage cursor holds; InvalidParams (400, `cursor`) if it holds none."""
    payload = decode_cursor(cursor)
    try:
        day = date.fromisoformat(payload["d"])
        user_id = payload["u"]
    except (KeyError, TypeError, ValueError) as exc:
        raise bad_cursor() from exc
    # Ids are 64-bit at most; a larger number would overflow SQLite's integers.
    if not isinstance(user_id, int) or isinstance(user_id, bool) or not 0 <= user_id < 2**63:
        raise bad_cursor()
    return UsageKey(day, user_id)


def history_read(
    tenant_id: int, state: JobState | None, after: HistoryKey | None, limit: int
) -> Select[Job]:
    """One index range read, newest first: the tenant's jobs (of one state) below `after`."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if state is not None:
        query = query.where(Job.state == state.value)
    if after is not None:
        query = query.where(tuple_(Job.created_at, Job.id) < (after.created_at, after.job_id))
    return query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)


def request_page(
    session: Session,
    tenant_id: int,
    status: str | None,
    limit: int,
    after: HistoryKey | None = None,
) -> JobPage:
    """A page of the tenant's requests, newest first, of one public status or all.

    Ties on created_at are broken by id, so pages never overlap or skip. FAILED
    covers two job states: each is read as its own index range (at most limit + 1
    rows each) and the two are merged, so the cost stays two short range reads
    however long the history.
    """
    states: Sequence[JobState | None] = PUBLIC_STATES[status] if status else (None,)
    jobs: list[Job] = []
    for state in states:
        jobs.extend(
            session.scalars(
                history_read(tenant_id, state, after, limit + 1).options(selectinload(Job.images))
            )
        )
    jobs.sort(key=lambda job: (job.created_at, job.id), reverse=True)
    page, more = jobs[:limit], len(jobs) > limit
    user_ids = {job.user_id for job in page}
    names: dict[int, str] = {}
    if user_ids:
        rows = session.execute(select(User.id, User.name).where(User.id.in_(user_ids)))
        names = {user_id: name for user_id, name in rows}
    last = page[-1] if page and more else None
    next_key = HistoryKey(last.created_at, last.id) if last else None
    return JobPage(jobs=page, user_names=names, next_key=next_key)


def usage_window(first: date | None, last: date | None, today: date) -> tuple[date, date]:
    """The inclusive days a usage report covers: defaults and bounds checked (400 if not)."""
    last = last or today
    if first is None:
        first = last - timedelta(days=29) if last > date.min + timedelta(days=29) else date.min
    if first > last:
        raise InvalidParams.single("from", "from_not_after_to", "must not be after `to`")
    if (last - first).days + 1 > MAX_USAGE_DAYS:
        raise InvalidParams.single(
            "to", "max_days", f"must be at most {MAX_USAGE_DAYS} days from `from` (inclusive)"
        )
    return first, last


def usage_read(
    tenant_id: int, first: date, last: date, limit: int, after: UsageKey | None = None
) -> Select[UsageDay, str]:
    """One index range read: the tenant's usage rows from `first` to `last` after `after`."""
    query = (
        select(UsageDay, User.name)
        .join(User, User.id == UsageDay.user_id)
        .where(UsageDay.tenant_id == tenant_id, UsageDay.day >= first, UsageDay.day <= last)
    )
    if after is not None:
        query = query.where(tuple_(UsageDay.day, UsageDay.user_id) > (after.day, after.user_id))
    return query.order_by(UsageDay.day, UsageDay.user_id).limit(limit)


def usage_page(
    session: Session,
    tenant_id: int,
    first: date,
    last: date,
    limit: int,
    after: UsageKey | None = None,
) -> UsagePage:
    """A page of the tenant's daily usage from `first` to `last` (inclusive), by day then user."""
    rows = session.execute(usage_read(tenant_id, first, last, limit + 1, after)).all()
    shown = rows[:limit]
    lines = [
        UsageRow(
            day=usage.day,
            user=name,
            granted=format_credits(usage.granted),
            held=format_credits(usage.held),
            captured=format_credits(usage.captured),
            released=format_credits(usage.released),
        )
        for usage, name in shown
    ]
    cursor = None
    if len(rows) > limit and shown:
        final = shown[-1][0]
        cursor = encode_usage_cursor(UsageKey(final.day, final.user_id))
    return UsagePage(usage=lines, next_cursor=cursor)


@dataclass(frozen=True)
class Account:
    """A user's name, tenant, role and balance (millicredits)."""

    user: str
    tenant: str
    is_admin: bool
    balance: int


def account(session: Session, user_id: int) -> Account:
    """Who a user is: name, tenant, whether an admin, and the spendable balance."""
    row = session.execute(
        select(User.name, Tenant.name, User.is_admin, User.balance)
        .join(Tenant, Tenant.id == User.tenant_id)
        .where(User.id == user_id)
    ).one()
    return Account(user=row[0], tenant=row[1], is_admin=bool(row[2]), balance=int(row[3]))
