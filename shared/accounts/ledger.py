"""The credit ledger: append-only entries and a cached balance that never goes negative.

Every function takes a session and never commits; the caller's transaction
makes a hold and the job it pays for appear together or not at all.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
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


def _record(session: Session, entry: LedgerEntry) -> None:
    """Append a ledger entry and add it to its user's usage for today, in one transaction."""
    session.add(entry)
    kind = LedgerKind(entry.kind)
    column = _USAGE_COLUMN[kind]
    # Every kind moves one positive amount: grants and releases into the balance,
    # holds into the hold, captures out of it.
    amount = (
        entry.available_delta
        if kind in (LedgerKind.GRANT, LedgerKind.RELEASE)
        else (abs(entry.held_delta))
    )
    values: dict[str, Any] = {
        "tenant_id": select(User.tenant_id).where(User.id == entry.user_id).scalar_subquery(),
        "user_id": entry.user_id,
        "day": utcnow().date(),
        column: amount,
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(UsageDay).values(**values)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[UsageDay.user_id, UsageDay.day],
            set_={column: getattr(UsageDay, column) + amount},
        )
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
    _record(
        session,
        LedgerEntry(
            user_id=user_id,
            kind=LedgerKind.GRANT.value,
            available_delta=amount,
            held_delta=0,
            note=note,
        ),
    )
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
    _record(
        session,
        LedgerEntry(
            user_id=user_id,
            job_id=job_id,
            kind=LedgerKind.HOLD.value,
            available_delta=-amount,
            held_delta=amount,
        ),
    )
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
    _record(
        session,
        LedgerEntry(
            user_id=user_id,
            job_id=job_id,
            kind=LedgerKind.CAPTURE.value,
            available_delta=0,
            held_delta=-amount,
        ),
    )


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
    _record(
        session,
        LedgerEntry(
            user_id=user_id,
            job_id=job_id,
            kind=LedgerKind.RELEASE.value,
            available_delta=outstanding,
            held_delta=-outstanding,
        ),
    )
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
