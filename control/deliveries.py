"""The webhook delivery worker: a Celery worker on its own queue, and the outbox sweeper.

`kolors-farm webhooks worker` runs both in one process, with no model and no
GPU: a thread pool of HTTP attempts (a receiver that hangs holds one thread for
the timeout, never a render) and a sweeper thread. The sweeper claims due rows
of the outbox (`shared.webhooks.outbox.claim_due`: pending, `next_attempt_at` passed) in
bounded batches and enqueues one task per claim. It runs every
`webhook_sweep_interval_s`, and at once when a job ends (it listens to the jobs'
end notices), so a `completed` event leaves within milliseconds of the commit. Any
number of delivery workers may run: claims are conditional UPDATEs, so each row
is enqueued by one sweeper at a time.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Final

import httpx
import redis
from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.celery_app import make_celery
from shared.db import transaction
from shared.jobs.deliveries import prepare
from shared.jobs.events import job_channel
from shared.resources import Resources, open_resources
from shared.settings import Settings
from shared.webhooks.delivery import http_client, post
from shared.webhooks.outbox import Claim, claim_due, record_outcome, take_claim

log = logging.getLogger(__name__)

WEBHOOK_QUEUE: Final = "webhooks"
DELIVER_TASK: Final = "kolors_farm.webhook_deliver"
SWEEP_BATCH: Final = 100


def publish_delivery(app: Celery, claim: Claim) -> None:
    """Enqueue one attempt of a claimed delivery on the webhooks queue."""
    app.send_task(DELIVER_TASK, args=[claim.delivery_id, claim.token], queue=WEBHOOK_QUEUE)


def deliver(resources: Resources, client: httpx.Client, delivery_id: str, token: str) -> str | None:
    """One attempt of a delivery this task's claim still holds; the delivery's new state.

    None when the claim is stale (a duplicate message, or one redelivered after its
    worker died and the row was claimed again): nothing is sent.
    """
    settings = resources.settings
    lease = timedelta(seconds=settings.webhook_lease_s)
    with transaction(resources.sessions) as session:
        if take_claim(session, Claim(delivery_id, token), lease) is None:
            return None
        prepared = prepare(session, delivery_id, settings, resources.storage)
    # No database connection is held while the receiver answers (or does not).
    outcome = None if prepared.skip else post(prepared, settings, client)
    with transaction(resources.sessions) as session:
        state = record_outcome(session, prepared, outcome, settings)
    log.info(
        "webhook %s (%s): %s after %s",
        delivery_id,
        prepared.event,
        state,
        "a skip (URL disabled)" if outcome is None else outcome.error or outcome.status_code,
    )
    return state


def register_delivery_task(app: Celery, resources: Resources, client: httpx.Client) -> None:
    """Bind the delivery task (by name) to this process's database and HTTP client."""

    @app.task(name=DELIVER_TASK, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def deliver_webhook(delivery_id: str, token: str) -> None:
        deliver(resources, client, delivery_id, token)


def sweep_once(resources: Resources, app: Celery, batch: int = SWEEP_BATCH) -> int:
    """Claim due deliveries and enqueue them; how many were enqueued."""
    lease = timedelta(seconds=resources.settings.webhook_lease_s)
    with transaction(resources.sessions) as session:
        claims = claim_due(session, lease, batch)
    for claim in claims:
        # A claim whose message is lost here is swept again once its lease lapses.
        publish_delivery(app, claim)
    return len(claims)


def sweep_loop(resources: Resources, app: Celery, stop: threading.Event) -> None:
    """Sweep every interval, and at once when a job ends, until `stop` is set."""
    interval = resources.settings.webhook_sweep_interval_s
    pubsub = None
    while not stop.is_set():
        try:
            if sweep_once(resources, app) >= SWEEP_BATCH:
                continue  # more are due: no wait
        except (OperationalError, InterfaceError, BrokerError, redis.RedisError, OSError) as exc:
            log.warning("webhook sweep failed (%s); retrying", type(exc).__name__)
        except Exception:
            # The sweeper is what makes deliveries durable: it must outlive any one failure.
            log.exception("webhook sweep failed; retrying")
        try:
            if pubsub is None:
                pubsub = resources.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(job_channel("*"))
            # Woken by any job's end notice, else the interval passes.
            if pubsub.get_message(timeout=interval) is not None:
                while pubsub.get_message(timeout=0) is not None:
                    pass
        except redis.RedisError:
            pubsub = None
            stop.wait(interval)
    if pubsub is not None:
        pubsub.close()


def run_delivery_worker(settings: Settings, name: str | None = None) -> int:
    """Serve webhook deliveries (and sweep the outbox) until SIGTERM or SIGINT."""
    if not settings.public_base_url:
        log.warning(
            "KOLORS_FARM_PUBLIC_BASE_URL is unset: image links in webhook bodies are paths "
            "(/v2/results/...), not absolute URLs"
        )
    # httpx logs every request's URL at INFO; a webhook URL may carry the receiver's token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    resources = open_resources(settings)
    client = http_client(settings)
    app = make_celery(settings)
    register_delivery_task(app, resources, client)
    stop = threading.Event()
    sweeper = threading.Thread(
        target=sweep_loop, args=(resources, app, stop), daemon=True, name="webhook-sweeper"
    )
    sweeper.start()
    name = name or f"webhooks-{os.getpid()}@{socket.gethostname()}"
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={settings.webhook_concurrency}",
                f"--hostname={name}",
                f"--queues={WEBHOOK_QUEUE}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel=INFO",
            ]
        )
    finally:
        stop.set()
        sweeper.join(timeout=settings.webhook_sweep_interval_s + 5)
        client.close()
        resources.close()
    return 0
