"""What operators see and do: tenants' queues, users and balances, credit grants.

Plain functions on a session that never commit. Every list is read in pages by
a unique name index (keyset pagination), so a page costs the same with 1,000
users as with ten.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.accounts.ledger import grant_credits
from shared.accounts.pricing import credits_to_millicredits
from shared.accounts.users import Principal, find_user
from shared.errors import FarmError, FieldProblem, InvalidParams
from shared.models import Tenant, TenantQueue, User

# One grant may add at most this many credits: a typo of a few extra digits is refused,
# and a balance can never approach the BIGINT it is stored in.
MAX_GRANT_CREDITS: Final = Decimal(1_000_000_000)
# The ledger's note column holds 200 characters; the granting admin's name goes first.
MAX_NOTE_CHARS: Final = 200


class Forbidden(FarmError):
    """A valid key whose user may not do this (an operator's route)."""

    status = 403
    title = "Forbidden"


def require_admin(principal: Principal) -> None:
    """Raise Forbidden unless the caller is an operator (a user created with --admin)."""
    if not principal.is_admin:
        raise Forbidden("This route is for operators: the API key's user is not an admin")


@dataclass(frozen=True)
class TenantRow:
    """One tenant's fair-share weight and queue."""

    name: str
    weight: int
    queued: int
    running: int
    oldest_queued_at: datetime | None


@dataclass(frozen=True)
class UserRow:
    """One user's tenant, balance (millicredits), role and weight."""

    name: str
    tenant: str
    balance: int
    is_admin: bool
    weight: int


def tenant_page(session: Session, after: str | None, limit: int) -> list[TenantRow]:
    """Up to `limit` tenants named after `after`, by name, with their queues' counts."""
    statement = (
        select(
            Tenant.name,
            TenantQueue.weight,
            TenantQueue.waiting,
            TenantQueue.in_flight,
            TenantQueue.oldest_created_at,
        )
        .join(TenantQueue, TenantQueue.tenant_id == Tenant.id)
        .order_by(Tenant.name)
        .limit(limit)
    )
    if after is not None:
        statement = statement.where(Tenant.name > after)
    return [
        TenantRow(
            name=row.name,
            weight=row.weight,
            queued=row.waiting,
            # Released to a worker but not yet claimed counts as running: it is off the queue.
            running=row.in_flight,
            oldest_queued_at=row.oldest_created_at,
        )
        for row in session.execute(statement)
    ]


def user_page(session: Session, after: str | None, limit: int) -> list[UserRow]:
    """Up to `limit` users named after `after`, by name, with tenant and balance."""
    statement = (
        select(User.name, Tenant.name.label("tenant"), User.balance, User.is_admin, User.weight)
        .join(Tenant, Tenant.id == User.tenant_id)
        .order_by(User.name)
        .limit(limit)
    )
    if after is not None:
        statement = statement.where(User.name > after)
    return [
        UserRow(
            name=row.name,
            tenant=row.tenant,
            balance=int(row.balance),
            is_admin=bool(row.is_admin),
            weight=row.weight,
        )
        for row in session.execute(statement)
    ]


def not_a_decimal() -> FieldProblem:
    """The problem of a grant whose credits are no decimal number (or no number at all)."""
    return FieldProblem("credits", "decimal", 'must be a decimal number of credits, like "12.5"')


def parse_grant_amount(raw: str | int | float) -> int:
    """A grant's credits (a positive decimal, at most three decimals) in millicredits.

    InvalidParams names the field `credits` and the rule it breaks.
    """
    text = str(raw).strip()
    try:
        amount = Decimal(text)
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite():
        raise InvalidParams([not_a_decimal()])
    if amount <= 0:
        raise InvalidParams.single("credits", "positive", "must be more than zero")
    if amount > MAX_GRANT_CREDITS:
        raise InvalidParams.single(
            "credits", "maximum", f"must be at most {MAX_GRANT_CREDITS} in one grant"
        )
    try:
        return credits_to_millicredits(amount)
    except ValueError:
        raise InvalidParams.single(
            "credits", "decimal_places", "must have at most three decimals (0.001 credit)"
        ) from None


def grant_to_user(
    session: Session, admin: Principal, name: str, millicredits: int, note: str | None
) -> int:
    """Grant `millicredits` to the user called `name`, noting which admin did; new balance.

    NotFound (and nothing written) for an unknown user.
    """
    require_admin(admin)
    user = find_user(session, name)
    recorded = f"granted by {admin.user_name}" + (f": {note}" if note else "")
    return grant_credits(session, user.id, millicredits, note=recorded[:MAX_NOTE_CHARS])
