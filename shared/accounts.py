"""Tenants, users and API keys (stored as SHA-256 hashes, never in clear)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.errors import Conflict, NotFound, Unauthorized
from shared.ledger import grant_credits
from shared.lines import refresh_tenant
from shared.models import MAX_WEIGHT, ApiKey, Tenant, TenantQueue, User, UserQueue

KEY_PREFIX: Final = "kf_"


@dataclass(frozen=True)
class Principal:
    """The caller an API key identifies."""

    user_id: int
    tenant_id: int
    user_name: str
    is_admin: bool = False


def hash_api_key(key: str) -> str:
    """SHA-256 hex of a key; keys are 256-bit random, so a fast hash is enough."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    """The tenant called `name`, created (with its empty queue) if missing."""
    tenant = session.execute(select(Tenant).where(Tenant.name == name)).scalar_one_or_none()
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
        session.add(TenantQueue(tenant_id=tenant.id, weight=tenant.weight))
    return tenant


def create_user(
    session: Session, name: str, tenant_name: str, credits: int, *, admin: bool = False
) -> tuple[User, str]:
    """Create a user with `credits` millicredits and a first API key; return both."""
    if session.execute(select(User.id).where(User.name == name)).first() is not None:
        raise Conflict(f"A user named {name!r} already exists")
    tenant = get_or_create_tenant(session, tenant_name)
    user = User(name=name, tenant_id=tenant.id, balance=0, is_admin=admin)
    session.add(user)
    session.flush()
    session.add(UserQueue(user_id=user.id, tenant_id=tenant.id))
    if credits > 0:
        grant_credits(session, user.id, credits, note="initial credits")
    return user, create_api_key(session, user.id)


def create_api_key(session: Session, user_id: int) -> str:
    """Issue a new API key for a user; the clear key is returned once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(user_id=user_id, key_hash=hash_api_key(key), prefix=key[:10]))
    return key


def find_user(session: Session, name: str) -> User:
    """The user called `name`."""
    user = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
    if user is None:
        raise NotFound(f"No user named {name!r}")
    return user


def authenticate(session: Session, key: str | None) -> Principal:
    """The principal of an active API key; Unauthorized otherwise."""
    if not key:
        raise Unauthorized("Missing API key: send it in the x-api-key header")
    row = session.execute(
        select(User.id, User.tenant_id, User.name, User.is_admin)
        .join(ApiKey, ApiKey.user_id == User.id)
        .where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        raise Unauthorized("Invalid API key")
    return Principal(
        user_id=row.id, tenant_id=row.tenant_id, user_name=row.name, is_admin=row.is_admin
    )


def set_user_weight(session: Session, name: str, weight: int) -> None:
    """Set a user's fair-share weight among the users of its tenant."""
    user_id = _set_weight(session, User, name, weight)
    # The tenant's next job may now be another user's.
    refresh_tenant(session, session.get_one(User, user_id).tenant_id)


def set_tenant_weight(session: Session, name: str, weight: int) -> None:
    """Set a tenant's fair-share weight among tenants."""
    tenant_id = _set_weight(session, Tenant, name, weight)
    session.execute(
        update(TenantQueue).where(TenantQueue.tenant_id == tenant_id).values(weight=weight)
    )
    refresh_tenant(session, tenant_id)


def _set_weight(session: Session, model: type[User] | type[Tenant], name: str, weight: int) -> int:
    if not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"a fair-share weight is a whole number from 1 to {MAX_WEIGHT}")
    updated = session.execute(
        update(model).where(model.name == name).values(weight=weight).returning(model.id)
    ).first()
    if updated is None:
        raise NotFound(f"No {model.__tablename__[:-1]} named {name!r}")
    row_id: int = updated.id
    return row_id
