"""Tenants, users and API keys (stored as SHA-256 hashes, never in clear)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from shared.accounts.ledger import grant_credits
from shared.errors import Conflict, NotFound, Unauthorized
from shared.models import MAX_WEIGHT, ApiKey, Tenant, TenantQueue, User, UserQueue, utcnow
from shared.scheduling.lines import refresh_tenant

KEY_PREFIX: Final = "kf_"
# What `keys list` shows and `keys revoke` takes: "kf_" and 7 random characters (42 bits).
DISPLAY_PREFIX_LENGTH: Final = 10
# A key's last use is written at most this often, so authentication stays a read.
LAST_USED_RESOLUTION: Final = timedelta(minutes=1)
# Redraws when a new key's display prefix is taken, so prefixes name one key each.
_PREFIX_DRAWS: Final = 5


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


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about an API key: never the key or its hash."""

    prefix: str
    user: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class KeyCheck:
    """An active key's principal, with what decides whether to record its use."""

    principal: Principal
    key_id: int
    last_used_at: datetime | None


def create_api_key(session: Session, user_id: int) -> str:
    """Issue a new API key for a user; the clear key is returned once and never stored."""
    for _ in range(_PREFIX_DRAWS):
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        prefix = key[:DISPLAY_PREFIX_LENGTH]
        # An index read; two keys under one prefix would make `keys revoke` refuse it.
        if session.execute(select(ApiKey.id).where(ApiKey.prefix == prefix)).first() is None:
            break
    session.add(ApiKey(user_id=user_id, key_hash=hash_api_key(key), prefix=prefix))
    session.flush()
    return key


def create_key_for_user(session: Session, name: str) -> str:
    """Issue one more API key for the user called `name`; the clear key is returned once."""
    return create_api_key(session, find_user(session, name).id)


def list_api_keys(session: Session, name: str) -> list[KeyInfo]:
    """The keys of the user called `name`, oldest first (prefixes and dates only)."""
    user = find_user(session, name)
    rows = session.execute(
        select(ApiKey.prefix, ApiKey.created_at, ApiKey.last_used_at, ApiKey.revoked_at)
        .where(ApiKey.user_id == user.id)
        .order_by(ApiKey.id)
    ).all()
    return [
        KeyInfo(
            prefix=row.prefix,
            user=user.name,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
        )
        for row in rows
    ]


def revoke_api_key(session: Session, prefix: str) -> tuple[KeyInfo, bool]:
    """Revoke the one active key shown as `prefix`; the key and whether this call revoked it.

    NotFound if no key has that prefix; Conflict if several active keys share it (nothing is
    revoked). A key that was already revoked is returned with False.
    """
    rows = session.execute(
        select(ApiKey, User.name)
        .join(User, User.id == ApiKey.user_id)
        .where(ApiKey.prefix == prefix)
        .order_by(ApiKey.id)
    ).all()
    if not rows:
        raise NotFound(
            f"No API key with prefix {prefix!r} (a prefix is the {DISPLAY_PREFIX_LENGTH} "
            "characters `kolors-farm keys list NAME` shows)"
        )
    active = [row for row in rows if row.ApiKey.revoked_at is None]
    if len(active) > 1:
        raise Conflict(
            f"{len(active)} active API keys share the prefix {prefix!r}; nothing was revoked"
        )
    if not active:
        return _key_info(rows[-1].ApiKey, rows[-1].name), False
    key, user_name = active[0].ApiKey, active[0].name
    # Conditional, so two concurrent revocations cannot both report having done it.
    revoked = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .returning(ApiKey.revoked_at)
    ).first()
    session.refresh(key)
    return _key_info(key, user_name), revoked is not None


def _key_info(key: ApiKey, user_name: str) -> KeyInfo:
    return KeyInfo(
        prefix=key.prefix,
        user=user_name,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        revoked_at=key.revoked_at,
    )


def find_user(session: Session, name: str) -> User:
    """The user called `name`."""
    if "\x00" in name:
        # No name holds a NUL; PostgreSQL would refuse the query rather than find nothing.
        raise NotFound(f"No user named {name!r}")
    user = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
    if user is None:
        raise NotFound(f"No user named {name!r}")
    return user


def check_api_key(session: Session, key: str | None) -> KeyCheck:
    """The principal of an active API key, with the key's id and last use; Unauthorized otherwise.

    A read of the database on every call (no cache), so a revoked key is refused at once.
    """
    if not key:
        raise Unauthorized("Missing API key: send it in the x-api-key header")
    row = session.execute(
        select(
            User.id,
            User.tenant_id,
            User.name,
            User.is_admin,
            ApiKey.id.label("key_id"),
            ApiKey.last_used_at,
        )
        .join(ApiKey, ApiKey.user_id == User.id)
        .where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        raise Unauthorized("Invalid API key")
    principal = Principal(
        user_id=row.id, tenant_id=row.tenant_id, user_name=row.name, is_admin=row.is_admin
    )
    return KeyCheck(principal=principal, key_id=row.key_id, last_used_at=row.last_used_at)


def authenticate(session: Session, key: str | None) -> Principal:
    """The principal of an active API key; Unauthorized otherwise."""
    return check_api_key(session, key).principal


def last_use_is_stale(last_used_at: datetime | None, now: datetime | None = None) -> bool:
    """Whether a key's recorded last use is old enough to be written again."""
    return last_used_at is None or last_used_at <= (now or utcnow()) - LAST_USED_RESOLUTION


def record_key_use(session: Session, key_id: int, now: datetime | None = None) -> bool:
    """Set a key's last use to now unless it was set within the last minute; whether it wrote.

    Conditional, so concurrent requests with one key write it once.
    """
    now = now or utcnow()
    written = session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - LAST_USED_RESOLUTION),
        )
        .values(last_used_at=now)
        .returning(ApiKey.id)
    ).first()
    return written is not None


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
