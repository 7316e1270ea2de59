"""Webhooks on the Standard Webhooks specification: secrets, the URL guard, the outbox, delivery.

A request may name a `webhook` URL and the events it wants (`start`, `completed`).
The transition that starts or ends its job writes a delivery row (the outbox) in
the same SQL transaction, so no event is lost to a crash. The delivery worker's
sweeper finds due rows on the partial index `ix_webhook_deliveries_due`, claims
them with a lease (a conditional UPDATE whose new `next_attempt_at` is the claim's
token) and enqueues one task per claim; a task whose token no longer matches (a
duplicate, or a message redelivered after its worker died) does nothing. A worker
killed mid-delivery leaves its row pending, so the sweeper claims it again once
the lease lapses: delivery is at least once, and the stable `webhook-id` lets
receivers drop the rare repeat.

The body is rendered at each attempt (fresh image links), signed with every valid
secret of the tenant, and POSTed to the address the guard resolved and checked
(never re-resolved, which defeats DNS rebinding), without following redirects.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Select, delete, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.clock import database_now
from shared.models import (
    DELIVERY_PENDING_SQL,
    DisabledWebhook,
    WebhookAttempt,
    WebhookDelivery,
)
from shared.settings import Settings
from shared.webhooks.delivery import Outcome, Prepared

EVENTS: Final = ("start", "completed")
DEFAULT_EVENTS: Final = ("completed",)
START: Final = "start"
COMPLETED: Final = "completed"
PENDING: Final = "pending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
DISABLED: Final = "disabled"


# ---------------------------------------------------------------- settings


def backoff_schedule(settings: Settings) -> list[float]:
    """The delays between attempts, in seconds (`KOLORS_FARM_WEBHOOK_BACKOFF_S`)."""
    return [float(part) for part in settings.webhook_backoff_s.split(",") if part.strip()]


# ---------------------------------------------------------------- secrets


# ---------------------------------------------------------------- the outbox


def new_delivery_id() -> str:
    """A stable, unguessable `webhook-id`."""
    return "msg_" + uuid.uuid4().hex


def job_events(webhook_events: str | None) -> set[str]:
    """The events a job's stored filter asks for."""
    return {event for event in (webhook_events or "").split(",") if event}


def add_delivery(
    session: Session,
    job_id: str,
    tenant_id: int,
    url: str | None,
    events: str | None,
    event: str,
) -> str | None:
    """Write the outbox row of `event` if the job asked for it (call in the transition's txn)."""
    if url is None or event not in job_events(events):
        return None
    delivery_id = new_delivery_id()
    now = database_now(session)
    session.add(
        WebhookDelivery(
            id=delivery_id,
            job_id=job_id,
            tenant_id=tenant_id,
            event=event,
            url=url,
            state=PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )
    return delivery_id


@dataclass(frozen=True)
class Claim:
    """A claimed delivery: its id and the token (its new next_attempt_at) that holds it."""

    delivery_id: str
    token: str


def _token(moment: datetime) -> str:
    return moment.isoformat()


# The partial index's own predicate, written out: SQLite uses a partial index only for a
# query that repeats its WHERE literally (a bound 'pending' would not do).
PENDING_ROWS: Final = text(f"({DELIVERY_PENDING_SQL})")


def due_read(now: datetime, limit: int) -> Select[str]:
    """The ids of pending deliveries due by `now`, oldest first (on `ix_webhook_deliveries_due`)."""
    return (
        select(WebhookDelivery.id)
        .where(PENDING_ROWS, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )


def claim_due(session: Session, lease: timedelta, limit: int = 100) -> list[Claim]:
    """Claim up to `limit` due pending deliveries (oldest first) for `lease`; the sweeper's read.

    Reads the partial index of pending rows only, however many deliveries the farm
    has made.
    """
    now = database_now(session)
    due = session.execute(due_read(now, limit)).scalars()
    claims = []
    for delivery_id in list(due):
        claim = _claim(session, delivery_id, None, now + lease)
        if claim is not None:
            claims.append(claim)
    return claims


def _claim(session: Session, delivery_id: str, token: str | None, until: datetime) -> Claim | None:
    conditions: list[Any] = [WebhookDelivery.id == delivery_id, WebhookDelivery.state == PENDING]
    if token is None:
        conditions.append(WebhookDelivery.next_attempt_at <= database_now(session))
    else:
        conditions.append(WebhookDelivery.next_attempt_at == datetime.fromisoformat(token))
    claimed = session.execute(
        update(WebhookDelivery)
        .where(*conditions)
        .values(next_attempt_at=until)
        .returning(WebhookDelivery.id)
    ).scalar_one_or_none()
    return Claim(delivery_id, _token(until)) if claimed is not None else None


def take_claim(session: Session, claim: Claim, lease: timedelta) -> Claim | None:
    """Renew a claim for the attempt itself; None if it is stale (another holds the row)."""
    return _claim(session, claim.delivery_id, claim.token, database_now(session) + lease)


def url_hash(url: str) -> str:
    """SHA-256 hex of a URL (the key of disabled URLs)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def is_disabled(session: Session, tenant_id: int, url: str) -> bool:
    """Whether the URL answered 410 Gone to this tenant before (deliveries to it are skipped)."""
    found = session.execute(
        select(DisabledWebhook.id).where(
            DisabledWebhook.tenant_id == tenant_id, DisabledWebhook.url_hash == url_hash(url)
        )
    ).first()
    return found is not None


# ---------------------------------------------------------------- the body


# ---------------------------------------------------------------- one attempt


def record_outcome(
    session: Session, prepared: Prepared, outcome: Outcome | None, settings: Settings
) -> str:
    """Log the attempt and move the delivery on: delivered, retried later, failed or disabled.

    `outcome` None records a skip (the URL was disabled). Returns the new state.
    """
    now = database_now(session)
    delivery = session.get_one(WebhookDelivery, prepared.delivery_id)
    if outcome is None:
        state = DISABLED
    else:
        session.add(
            WebhookAttempt(
                delivery_id=prepared.delivery_id,
                attempted_at=now,
                latency_ms=outcome.latency_ms,
                status_code=outcome.status_code,
                error=outcome.error,
            )
        )
        delivery.attempts += 1
        schedule = backoff_schedule(settings)
        if outcome.delivered:
            state = DELIVERED
        elif outcome.status_code == 410:
            state = DISABLED
            _disable(session, prepared.tenant_id, prepared.url)
        elif outcome.retryable and delivery.attempts <= len(schedule):
            delay = schedule[delivery.attempts - 1] * random.uniform(0.8, 1.2)  # noqa: S311
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            session.flush()
            return PENDING
        else:
            state = FAILED
    delivery.state = state
    delivery.next_attempt_at = None
    delivery.finished_at = now
    session.flush()
    return state


def _disable(session: Session, tenant_id: int, url: str) -> None:
    if is_disabled(session, tenant_id, url):
        return
    try:
        with session.begin_nested():
            session.add(DisabledWebhook(tenant_id=tenant_id, url_hash=url_hash(url), url=url))
    except IntegrityError:
        pass  # a concurrent 410 disabled it first


# ---------------------------------------------------------------- the routes' reads and writes


@dataclass(frozen=True)
class AttemptInfo:
    """One attempt as the API lists it."""

    attempted_at: datetime
    latency_ms: int | None
    status_code: int | None
    error: str | None


@dataclass(frozen=True)
class DeliveryInfo:
    """One delivery and its latest attempts, as the API lists them."""

    webhook_id: str
    event: str
    url: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None
    attempt_log: list[AttemptInfo]


MAX_LISTED_ATTEMPTS: Final = 50


def list_deliveries(session: Session, job_id: str) -> list[DeliveryInfo]:
    """A job's deliveries (oldest first), each with its latest attempts (oldest first)."""
    deliveries = session.execute(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
    ).scalars()
    found = []
    for delivery in deliveries:
        attempts = session.execute(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == delivery.id)
            .order_by(WebhookAttempt.id.desc())
            .limit(MAX_LISTED_ATTEMPTS)
        ).scalars()
        log = [AttemptInfo(a.attempted_at, a.latency_ms, a.status_code, a.error) for a in attempts]
        found.append(
            DeliveryInfo(
                webhook_id=delivery.id,
                event=delivery.event,
                url=delivery.url,
                state=delivery.state,
                attempts=delivery.attempts,
                next_attempt_at=delivery.next_attempt_at if delivery.state == PENDING else None,
                created_at=delivery.created_at,
                finished_at=delivery.finished_at,
                attempt_log=log[::-1],
            )
        )
    return found


class NothingToRedeliver(Exception):
    """The request has no delivery, or its latest one is still pending."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def redeliver_latest(session: Session, job_id: str) -> str:
    """Send the job's latest delivery again now (same webhook-id, a fresh round of retries).

    A URL disabled by a 410 is enabled again for the tenant: asking to redeliver
    says the receiver is back. Raises NothingToRedeliver (404: none; 409: still pending).
    """
    delivery = session.execute(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if delivery is None:
        raise NothingToRedeliver(404, "This request has no webhook deliveries")
    now = database_now(session)
    moved = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.state != PENDING)
        .values(state=PENDING, attempts=0, next_attempt_at=now, finished_at=None)
        .returning(WebhookDelivery.id)
    ).scalar_one_or_none()
    if moved is None:
        raise NothingToRedeliver(
            409, "The latest delivery is still pending; it is retried on its schedule"
        )
    session.execute(
        delete(DisabledWebhook).where(
            DisabledWebhook.tenant_id == delivery.tenant_id,
            DisabledWebhook.url_hash == url_hash(delivery.url),
        )
    )
    return delivery.id
