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

import base64
import hashlib
import json
import random
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import httpx
from sqlalchemy import Select, delete, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from shared import bodies
from shared.errors import NotFound
from shared.models import (
    DELIVERY_PENDING_SQL,
    DisabledWebhook,
    Job,
    Tenant,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSecret,
    utcnow,
)
from shared.params import KolorsParams
from shared.queries import results_expired
from shared.settings import Settings
from shared.storage import ResultStorage
from shared.webhook_urls import (
    WebhookRefused,
    allowed_networks,
    resolve_target,
)

EVENTS: Final = ("start", "completed")
DEFAULT_EVENTS: Final = ("completed",)
START: Final = "start"
COMPLETED: Final = "completed"
PENDING: Final = "pending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
DISABLED: Final = "disabled"

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the format's prefix, not a secret
SECRET_BYTES: Final = 32
ROTATION_OVERLAP: Final = timedelta(hours=24)
RESPONSE_CAP_BYTES: Final = 4096
ERROR_LENGTH: Final = 500
RETRYABLE_STATUSES: Final = frozenset({408, 429})
USER_AGENT: Final = "kolors-farm-webhooks/1"


# ---------------------------------------------------------------- settings


def backoff_schedule(settings: Settings) -> list[float]:
    """The delays between attempts, in seconds (`KOLORS_FARM_WEBHOOK_BACKOFF_S`)."""
    return [float(part) for part in settings.webhook_backoff_s.split(",") if part.strip()]


# ---------------------------------------------------------------- secrets


def new_secret() -> str:
    """A new signing secret in the Standard Webhooks format: whsec_ + base64 of random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def _tenant_id(session: Session, name: str) -> int:
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
        .values(expires_at=utcnow() + ROTATION_OVERLAP)
    )
    fresh = WebhookSecret(tenant_id=tenant_id, secret=new_secret())
    session.add(fresh)
    session.flush()
    return fresh.secret


def signing_secrets(session: Session, tenant_id: int, now: datetime | None = None) -> list[str]:
    """Every secret of the tenant that still signs: the current one and any rotated < 24 h ago."""
    moment = now or utcnow()
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


# ---------------------------------------------------------------- the outbox


def new_delivery_id() -> str:
    """A stable, unguessable `webhook-id`."""
    return "msg_" + uuid.uuid4().hex


def webhook_fields(params: KolorsParams) -> dict[str, str | None]:
    """A new job's `webhook_url` and `webhook_events` columns, from its request."""
    if params.webhook is None:
        return {"webhook_url": None, "webhook_events": None}
    return {
        "webhook_url": params.webhook,
        "webhook_events": ",".join(params.webhook_events_filter),
    }


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
    now = utcnow()
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
    now = utcnow()
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
        conditions.append(WebhookDelivery.next_attempt_at <= utcnow())
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
    return _claim(session, claim.delivery_id, claim.token, utcnow() + lease)


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


def status_body(job: Job) -> dict[str, Any]:
    """The `start` event's body: GET /v2/requests/{id}/status as it stands (no live progress)."""
    return bodies.status_body(job).model_dump(mode="json")


def result_body(job: Job, settings: Settings, storage: ResultStorage) -> dict[str, Any]:
    """The `completed` event's body: GET /v2/requests/{id} with fresh, absolute image links.

    Links are absolute under `public_base_url`; when it is unset they are paths
    (`/v2/results/...`) the receiver resolves against the farm's address.
    """
    expires_at = bodies.links_expire_at(job, settings)
    images = [] if results_expired(job) else list(job.images)
    base = settings.public_base_url or ""
    links = [bodies.image_link(job, image, expires_at, settings, storage, base) for image in images]
    return bodies.result_body(job, images, links, expires_at).model_dump(mode="json")


# ---------------------------------------------------------------- one attempt


@dataclass(frozen=True)
class Prepared:
    """Everything an attempt needs, read in one short transaction (none is held while sending)."""

    delivery_id: str
    tenant_id: int
    url: str
    event: str
    body: str
    secrets: list[str]
    skip: str | None = None  # DISABLED: the URL answered 410 before; nothing is sent


def prepare(
    session: Session, delivery_id: str, settings: Settings, storage: ResultStorage
) -> Prepared:
    """Read the delivery, its job and the tenant's secrets; render the body."""
    delivery = session.get_one(WebhookDelivery, delivery_id)
    if is_disabled(session, delivery.tenant_id, delivery.url):
        return Prepared(
            delivery_id, delivery.tenant_id, delivery.url, delivery.event, "", [], DISABLED
        )
    job = session.get_one(Job, delivery.job_id)
    body = status_body(job) if delivery.event == START else result_body(job, settings, storage)
    return Prepared(
        delivery_id=delivery_id,
        tenant_id=delivery.tenant_id,
        url=delivery.url,
        event=delivery.event,
        body=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
        secrets=signing_secrets(session, delivery.tenant_id),
    )


@dataclass(frozen=True)
class Outcome:
    """What one HTTP attempt gave: a status code, or an error (no answer)."""

    status_code: int | None
    latency_ms: int
    error: str | None

    @property
    def retryable(self) -> bool:
        """Timeouts, connection errors, 5xx, 408 and 429 are tried again later."""
        code = self.status_code
        return code is None or code >= 500 or code in RETRYABLE_STATUSES

    @property
    def delivered(self) -> bool:
        """A 2xx answer."""
        return self.status_code is not None and 200 <= self.status_code < 300


def post(prepared: Prepared, settings: Settings, client: httpx.Client) -> Outcome:
    """POST the signed body to the checked address; never follows a redirect."""
    started = time.monotonic()
    try:
        target = resolve_target(prepared.url, allowed_networks(settings))
    except WebhookRefused as exc:
        return Outcome(None, 0, f"refused: {exc.message}"[:ERROR_LENGTH])
    timestamp = utcnow()
    headers = {
        "host": target.host_header,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": prepared.delivery_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": sign(prepared.secrets, prepared.delivery_id, timestamp, prepared.body),
    }
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    deadline = started + settings.webhook_timeout_s
    try:
        with client.stream(
            "POST",
            target.connect_url,
            content=prepared.body.encode("utf-8"),
            headers=headers,
            extensions=extensions,
            follow_redirects=False,
        ) as response:
            text = _read_capped(response, deadline)
            code = response.status_code
    except httpx.TimeoutException:
        return Outcome(None, _ms(started), "timed out")
    except httpx.HTTPError as exc:
        return Outcome(None, _ms(started), f"{type(exc).__name__}: {exc}"[:ERROR_LENGTH])
    error = None
    if not 200 <= code < 300:
        error = f"HTTP {code}: {text}"[:ERROR_LENGTH] if text else f"HTTP {code}"
    return Outcome(code, _ms(started), error)


def _read_capped(response: httpx.Response, deadline: float) -> str:
    """At most RESPONSE_CAP_BYTES of the answer, and only until the attempt's deadline."""
    data = b""
    for chunk in response.iter_raw():
        data += chunk
        if len(data) >= RESPONSE_CAP_BYTES or time.monotonic() > deadline:
            break
    return data[:RESPONSE_CAP_BYTES].decode("utf-8", errors="replace").strip()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def http_client(settings: Settings) -> httpx.Client:
    """The delivery worker's HTTP client: the webhook timeout, no redirects, no proxies."""
    return httpx.Client(
        timeout=httpx.Timeout(settings.webhook_timeout_s),
        follow_redirects=False,
        trust_env=False,
    )


def record_outcome(
    session: Session, prepared: Prepared, outcome: Outcome | None, settings: Settings
) -> str:
    """Log the attempt and move the delivery on: delivered, retried later, failed or disabled.

    `outcome` None records a skip (the URL was disabled). Returns the new state.
    """
    now = utcnow()
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
    moved = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.state != PENDING)
        .values(state=PENDING, attempts=0, next_attempt_at=utcnow(), finished_at=None)
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
