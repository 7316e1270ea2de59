"""The Celery application both sides share: the API publishes by task name, workers consume."""

from __future__ import annotations

from typing import Final

from celery import Celery

from shared.settings import Settings

RENDER_TASK: Final = "kolors_farm.render"
RENDER_QUEUE: Final = "render"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on Redis, configured for at-least-once delivery of long renders."""
    app = Celery("kolors_farm", broker=settings.require_redis_url(), set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=RENDER_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_transport_options={
            # A message unacked this long is redelivered; it must outlast the longest render.
            # (The SQL lease, not this, is what recovers a dead worker's job quickly.)
            "visibility_timeout": settings.visibility_timeout_s,
            # Scan for such messages every quarter of that (at most every 60 s), on
            # every sweep rather than every tenth, so the delay is predictable.
            "unacked_restore_interval": max(1, min(60, settings.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
        },
    )
    return app


def publish_render(app: Celery, job_id: str) -> None:
    """Send a render message carrying only the job id."""
    app.send_task(RENDER_TASK, args=[job_id], queue=RENDER_QUEUE)
