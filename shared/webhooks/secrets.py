"""Tenants' webhook signing secrets (`whsec_...`): creation, rotation (24 h overlap), signing."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from shared.clock import database_now
from shared.errors import NotFound
from shared.models import (
    Tenant,
    WebhookSecret,
)

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the format's prefix, not a secret


SECRET_BYTES: Final = 32


ROTATION_OVERLAP: Final = timedelta(hours=24)


def new_secret() -> str:
    """A new signing secret in the Standard Webhooks format: whsec_ + base64 of random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def _tenant_id(session: Session, name: str) -> int:
    if "\x00" in name:
        # No name holds a NUL; PostgreSQL would refuse the query rather than find nothing.
        raise NotFound(f"No tenant named {name!r}")
    tenant_id = session.execute(select(Tenant.id).where(Tenant.name == name)).scalar_one_or_none()
    if tenant_id is None:
        raise NotFound(f"No tenant named {name!r}")
    return tenant_id


def _current_secret(session: Session, tenant_id: int) -> WebhookSecret | None:
    return session.execute(
        select(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at.is_(None))
        .order_by(WebhookSecret.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def tenant_secret(session: Session, tenant_id: int) -> str:
    """The tenant's current signing secret, created on first use."""
    current = _current_secret(session, tenant_id)
    if current is None:
        current = WebhookSecret(tenant_id=tenant_id, secret=new_secret())
        session.add(current)
        session.flush()
    return current.secret


def tenant_secret_by_name(session: Session, tenant: str) -> str:
    """The current signing secret of the tenant called `tenant` (created if missing)."""
    return tenant_secret(session, _tenant_id(session, tenant))


def secrets_by_name(session: Session, tenant: str) -> list[str]:
    """Every secret that signs for the tenant called `tenant` now, the current one first."""
    return signing_secrets(session, _tenant_id(session, tenant))


def rotate_secret(session: Session, tenant: str) -> str:
    """Replace the tenant's secret; the old one keeps signing for 24 hours. The new secret."""
    tenant_id = _tenant_id(session, tenant)
    session.execute(
        update(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at.is_(None))
        .values(expires_at=database_now(session) + ROTATION_OVERLAP)
    )
    fresh = WebhookSecret(tenant_id=tenant_id, secret=new_secret())
    session.add(fresh)
    session.flush()
    return fresh.secret


def signing_secrets(session: Session, tenant_id: int, now: datetime | None = None) -> list[str]:
    """Every secret of the tenant that still signs: the current one and any rotated < 24 h ago."""
    moment = now or database_now(session)
    tenant_secret(session, tenant_id)
    found = session.execute(
        select(WebhookSecret.secret)
        .where(
            WebhookSecret.tenant_id == tenant_id,
            (WebhookSecret.expires_at.is_(None)) | (WebhookSecret.expires_at > moment),
        )
        .order_by(WebhookSecret.id.desc())
    ).scalars()
    return list(found)


def sign(secrets_: Sequence[str], msg_id: str, timestamp: datetime, body: str) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per secret, space-separated."""
    return " ".join(Webhook(secret).sign(msg_id, timestamp, body) for secret in secrets_)
