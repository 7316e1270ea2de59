"""What a job's webhook events send: `start` and `completed` bodies, rendered at each attempt."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from shared.clock import database_now
from shared.jobs import bodies
from shared.models import (
    Job,
    WebhookDelivery,
)
from shared.settings import Settings
from shared.storage import ResultStorage
from shared.webhooks.delivery import Prepared
from shared.webhooks.outbox import DISABLED, START, is_disabled
from shared.webhooks.secrets import signing_secrets


def status_body(job: Job) -> dict[str, Any]:
    """The `start` event's body: GET /v2/requests/{id}/status as it stands (no live progress)."""
    return bodies.status_body(job).model_dump(mode="json")


def result_body(
    job: Job, settings: Settings, storage: ResultStorage, now: datetime
) -> dict[str, Any]:
    """The `completed` event's body: GET /v2/requests/{id} with fresh, absolute image links.

    Links are absolute under `public_base_url`; when it is unset they are paths
    (`/v2/results/...`) the receiver resolves against the farm's address.
    """
    body = bodies.result_of(job, settings, storage, settings.public_base_url or "", now)
    return body.model_dump(mode="json")


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
    if delivery.event == START:
        body = status_body(job)
    else:
        body = result_body(job, settings, storage, database_now(session))
    return Prepared(
        delivery_id=delivery_id,
        tenant_id=delivery.tenant_id,
        url=delivery.url,
        event=delivery.event,
        body=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
        secrets=signing_secrets(session, delivery.tenant_id),
    )
