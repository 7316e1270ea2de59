"""The credit ledger: append-only entries and a cached balance that never goes negative.

Every function takes a session and never commits; the caller's transaction
makes a hold and the job it pays for appear together or not at all.
"""

from __future__ import annotations

import typing
from typing import Any, Final

from sqlalchemy import BigInteger, Table, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.errors import NotEnoughCredits, NotFound
from shared.models import LedgerEntry, LedgerKind, UsageDay, User, utcnow

# The usage rollup column each kind of entry adds to.
_USAGE_COLUMN = {
    LedgerKind.GRANT: "granted",
    LedgerKind.HOLD: "held",
    LedgerKind.CAPTURE: "captured",
    LedgerKind.RELEASE: "released",
}


_ENTRIES: Final = typing.cast(Table, LedgerEntry.__table__)
_USAGE: Final = typing.cast(Table, UsageDay.__table__)
_USERS: Final = typing.cast(Table, User.__table__)
_INSERT_ENTRY: Final = insert(_ENTRIES)
# Built once per dialect and column: the ledger writes on every image of every job.
_usage_upserts: dict[tuple[str, str], Any] = {}


def _usage_upsert(dialect: str, column: str) -> Any:
    """The statement adding `amount` to a user's usage `column` for `day` (made if missing)."""
    statement = _usage_upserts.get((dialect, column))
    if statement is None:
        dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        amount = bindparam("usage_amount", type_=BigInteger)
        statement = (
            dialect_insert(_USAGE)
            .values(
                tenant_id=select(_USERS.c.tenant_id)
                .where(_USERS.c.id == bindparam("usage_user_id"))
                .scalar_subquery(),
                user_id=bindparam("usage_user_id"),
                day=bindparam("usage_day"),
                **{column: amount},
            )
            .on_conflict_do_update(
                index_elements=[_USAGE.c.user_id, _USAGE.c.day],
                set_={column: _USAGE.c[column] + amount},
            )
        )
        _usage_upserts[(dialect, column)] = statement
    return statement


def _record(
    session: Session,
    kind: LedgerKind,
    user_id: int,
    available_delta: int,
    held_delta: int,
    job_id: str | None = None,
    note: str | None = None,
) -> None:
    """Append a ledger entry and add it to its user's usage for today, in one transaction."""
    entry = {
        "user_id": user_id,
        "job_id": job_id,
        "kind": kind.value,
        "available_delta": available_delta,
        "held_delta": held_delta,
        "note": note,
    }
    session.execute(_INSERT_ENTRY, entry)
    # Every kind moves one positive amount: grants and releases into the balance,
    # holds into the hold, captures out of it.
    amount = available_delta if kind in (LedgerKind.GRANT, LedgerKind.RELEASE) else abs(held_delta)
    upsert = _usage_upsert(session.get_bind().dialect.name, _USAGE_COLUMN[kind])
    session.execute(
        upsert, {"usage_user_id": user_id, "usage_day": utcnow().date(), "usage_amount": amount}
    )


def grant_credits(session: Session, user_id: int, amount: int, note: str | None = None) -> int:
    """Add `amount` millicredits to a user's balance; return the new balance."""
    if amount <= 0:
        raise ValueError("a grant must be positive")
    balance = session.execute(
        update(User)
        .where(User.id == user_id)
        .values(balance=User.balance + amount)
        .returning(User.balance)
    ).scalar_one_or_none()
    if balance is None:
        raise NotFound(f"No user with id {user_id}")
    _record(session, LedgerKind.GRANT, user_id, available_delta=amount, held_delta=0, note=note)
    return balance


def hold_credits(session: Session, user_id: int, job_id: str, amount: int) -> int:
    """Move `amount` from the balance to a hold for `job_id`; NotEnoughCredits if it can't."""
    # One conditional UPDATE: concurrent holds can never overdraw, on any database.
    balance = session.execute(
        update(User)
        .where(User.id == user_id, User.balance >= amount)
        .values(balance=User.balance - amount)
        .returning(User.balance)
    ).scalar_one_or_none()
    if balance is None:
        raise NotEnoughCredits()
    _record(session, LedgerKind.HOLD, user_id, -amount, amount, job_id=job_id)
    return balance


def capture_image_credit(
    session: Session, user_id: int, job_id: str, amount: int, *, held: int | None = None
) -> None:
    """Spend `amount` of a job's hold for one delivered image.

    `held` is what the job still holds, when the caller read it from the job's row in
    this transaction (price x undelivered images); otherwise it is summed from the ledger.
    """
    outstanding = held_for_job(session, job_id) if held is None else held
    if amount > outstanding:
        raise ValueError(f"capture of {amount} exceeds the {outstanding} held for job {job_id}")
    _record(session, LedgerKind.CAPTURE, user_id, 0, -amount, job_id=job_id)


def release_hold(session: Session, user_id: int, job_id: str, *, held: int | None = None) -> int:
    """Return whatever is still held for a job to the balance; return the amount released.

    `held` as for `capture_image_credit`.
    """
    outstanding = held_for_job(session, job_id) if held is None else held
    if outstanding <= 0:
        return 0
    session.execute(
        update(User).where(User.id == user_id).values(balance=User.balance + outstanding)
    )
    _record(session, LedgerKind.RELEASE, user_id, outstanding, -outstanding, job_id=job_id)
    return outstanding


def held_for_job(session: Session, job_id: str) -> int:
    """The amount still held for a job (sum of its held_delta)."""
    session.flush()
    total = session.execute(
        select(func.coalesce(func.sum(LedgerEntry.held_delta), 0)).where(
            LedgerEntry.job_id == job_id
        )
    ).scalar_one()
    return int(total)


def get_balance(session: Session, user_id: int) -> int:
    """A user's spendable balance in millicredits."""
    balance = session.execute(select(User.balance).where(User.id == user_id)).scalar_one_or_none()
    if balance is None:
        raise NotFound(f"No user with id {user_id}")
    return int(balance)


def ledger_balance(session: Session, user_id: int) -> int:
    """The balance recomputed from the ledger (must equal the cached one)."""
    session.flush()
    total = session.execute(
        select(func.coalesce(func.sum(LedgerEntry.available_delta), 0)).where(
            LedgerEntry.user_id == user_id
        )
    ).scalar_one()
    return int(total)
