"""A request's webhook deliveries: the log of every attempt, and sending again."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from flask import Blueprint, Response
from pydantic import BaseModel, Field

from api.auth import authenticated, current_principal
from api.context import farm
from api.errors import problem
from api.spec import operation, respond
from shared.db import read_only, transaction
from shared.jobs.queries import get_job
from shared.webhooks.outbox import (
    DeliveryInfo,
    NothingToRedeliver,
    job_events,
    list_deliveries,
    redeliver_latest,
)

bp = Blueprint("webhooks", __name__)

DeliveryState = Literal["pending", "delivered", "failed", "disabled"]
EventName = Literal["start", "completed"]


class WebhookAttemptOut(BaseModel):
    """One HTTP attempt of a delivery."""

    attempted_at: datetime
    latency_ms: int | None = Field(description="Until the answer (or the error), in ms.")
    status_code: int | None = Field(description="The receiver's status; null: no answer.")
    error: str | None = Field(description="Why it did not count as delivered (null if it did).")


class WebhookDeliveryOut(BaseModel):
    """One event of the request and its delivery (`webhook_id` is the `webhook-id` header)."""

    webhook_id: str
    event: EventName
    url: str
    state: DeliveryState = Field(
        description="pending (retried on its schedule), delivered, failed (gave up or not "
        "retryable) or disabled (the URL answered 410 Gone)."
    )
    attempts: int = Field(ge=0, description="Attempts in the current round (reset by redeliver).")
    next_attempt_at: datetime | None = Field(description="When pending: the next attempt.")
    created_at: datetime
    finished_at: datetime | None
    attempt_log: list[WebhookAttemptOut] = Field(description="Its latest attempts, oldest first.")


class WebhookDeliveries(BaseModel):
    """A request's webhook and its deliveries, oldest first."""

    request_id: str
    webhook: str | None = Field(description="The request's webhook URL (null: none).")
    webhook_events_filter: list[EventName]
    deliveries: list[WebhookDeliveryOut]


def _out(info: DeliveryInfo) -> WebhookDeliveryOut:
    return WebhookDeliveryOut(
        webhook_id=info.webhook_id,
        event=info.event,
        url=info.url,
        state=info.state,
        attempts=info.attempts,
        next_attempt_at=info.next_attempt_at,
        created_at=info.created_at,
        finished_at=info.finished_at,
        attempt_log=[
            WebhookAttemptOut(
                attempted_at=a.attempted_at,
                latency_ms=a.latency_ms,
                status_code=a.status_code,
                error=a.error,
            )
            for a in info.attempt_log
        ],
    )


@bp.get("/v2/requests/<job_id>/webhooks")
@operation(
    summary="A request's webhook deliveries and their attempts",
    response=WebhookDeliveries,
    errors=(401, 404, 503),
    tags=("requests",),
    operation_id="listRequestWebhooks",
)
@authenticated
def request_webhooks(job_id: str) -> Response:
    """The request's deliveries (another tenant's request is a 404)."""
    with read_only(farm().sessions) as session:
        job = get_job(session, current_principal(), job_id)
        deliveries = list_deliveries(session, job.id)
    events = [e for e in ("start", "completed") if e in job_events(job.webhook_events)]
    return respond(
        WebhookDeliveries(
            request_id=job.id,
            webhook=job.webhook_url,
            webhook_events_filter=events,
            deliveries=[_out(info) for info in deliveries],
        )
    )


@bp.post("/v2/requests/<job_id>/webhooks/redeliver")
@operation(
    summary="Send a request's latest webhook delivery again now",
    description="The latest delivery (the `completed` event once there is one) goes back to "
    "pending with the same `webhook-id` and a fresh round of retries; a URL disabled by a 410 "
    "is enabled again. 404: the request has no delivery; 409: the latest is still pending.",
    response=WebhookDeliveryOut,
    status=202,
    errors=(401, 404, 409, 503),
    tags=("requests",),
    operation_id="redeliverRequestWebhook",
)
@authenticated
def redeliver_webhook(job_id: str) -> Response:
    """Put the latest delivery back in the outbox; the delivery worker sends it within a second."""
    try:
        with transaction(farm().sessions) as session:
            job = get_job(session, current_principal(), job_id)
            delivery_id = redeliver_latest(session, job.id)
    except NothingToRedeliver as exc:
        return problem(exc.status, "Nothing to redeliver", exc.message)
    with read_only(farm().sessions) as session:
        info = next(d for d in list_deliveries(session, job.id) if d.webhook_id == delivery_id)
    return respond(_out(info), 202)
