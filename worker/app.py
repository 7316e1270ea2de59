"""The worker process: load the model (fatal on failure), then consume render messages."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import Any

from celery import Celery
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.celery_app import RENDER_QUEUE, RENDER_TASK, make_celery
from shared.db import transaction
from shared.jobs.cache import FINGERPRINT_FIELD
from shared.jobs.transitions import reclaim_claims_of
from shared.logs import configure_logging
from shared.resources import Resources, open_resources
from shared.scheduling.fleet import forget_worker, record_heartbeat, reset_settling
from shared.settings import Settings
from worker.context import WorkerContext
from worker.pipeline import KolorsRenderer
from worker.render import start_render_job

log = logging.getLogger(__name__)


def register_render_task(app: Celery, context: WorkerContext) -> None:
    """Bind the render task (by name) to this process's loaded pipeline."""

    @app.task(name=RENDER_TASK, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def render(job_id: str) -> None:
        # Returns once the job is rendered, so the next message is taken while this job's
        # last images are still stored and recorded; its lease is held until it settles.
        start_render_job(context, job_id)


def worker_info(context: WorkerContext, static: dict[str, Any]) -> dict[str, Any]:
    """The worker's heartbeat: device, memory, warm state, current job and busy fraction."""
    recent, since_start = context.busy.fractions()
    return (
        static
        | context.renderer.device_status()
        | {
            "warm": context.renderer.warm,
            "job": context.current_job,
            # Time inside pipeline calls over wall time: the last minute, and since start.
            "busy_fraction": recent,
            "busy_fraction_since_start": since_start,
        }
    )


def heartbeat_loop(context: WorkerContext, stop: threading.Event) -> None:
    """Refresh this worker's heartbeat every interval until `stop` is set."""
    static = {
        "device": str(context.renderer.device),
        "model": context.renderer.model_id,
        # The result cache looks up only while every live worker names the same one.
        FINGERPRINT_FIELD: context.renderer.render_fingerprint,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    interval = context.settings.heartbeat_interval_s
    while not stop.is_set():
        try:
            info = worker_info(context, static)
            record_heartbeat(context.redis, context.name, info, ttl_s=interval * 3)
        except Exception as exc:
            log.warning("heartbeat failed: %s", type(exc).__name__)
        stop.wait(interval)


def reclaim_previous_claims(resources: Resources, name: str) -> None:
    """Give back the jobs this worker's previous life held (it was killed), before loading.

    A worker's name is its device and host, so a restarted worker is the same one: what
    it held, nobody renders. Waiting out their leases would leave a device idle and a
    user waiting; a database that is away leaves them to the leases instead.
    """
    try:
        with transaction(resources.sessions) as session:
            outcomes = reclaim_claims_of(session, [name], resources.settings.max_attempts)
    except (OperationalError, InterfaceError) as exc:
        log.warning("previous claims not reclaimed (%s); their leases will", type(exc).__name__)
        return
    for outcome in outcomes:
        log.warning(
            "job %s: attempt %d of this worker's previous life given back; now %s",
            outcome.job_id,
            outcome.attempt,
            outcome.state.value,
        )


def run_worker(settings: Settings, device: str | None, name: str | None) -> int:
    """Load the pipeline, then serve render jobs until stopped; 1 if loading fails."""
    device = device or settings.device
    name = name or f"{device.replace(':', '')}@{socket.gethostname()}"
    resources = open_resources(settings)
    reclaim_previous_claims(resources, name)
    try:
        renderer = KolorsRenderer.load(settings, device)
        if settings.warmup:
            log.info("warmed up in %.1f s", renderer.warm_up())
    except Exception:
        # Celery would swallow this in a signal handler; failing here keeps the process honest.
        log.exception("could not load the Kolors pipeline (KOLORS_FARM_MODEL=%s)", settings.model)
        resources.close()
        return 1
    context = WorkerContext(
        name=name,
        settings=settings,
        sessions=resources.sessions,
        redis=resources.redis,
        storage=resources.storage,
        renderer=renderer,
    )
    reset_settling(context.redis, name)
    app = make_celery(settings)
    register_render_task(app, context)
    stop = threading.Event()
    threading.Thread(
        target=heartbeat_loop, args=(context, stop), daemon=True, name="heartbeat"
    ).start()
    try:
        app.worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                f"--hostname={name}",
                f"--queues={RENDER_QUEUE}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel=INFO",
            ]
        )
    finally:
        # Celery returns after a warm shutdown (SIGTERM) with the last task done; its
        # job's last images may still wait in the post-processing queue.
        drained = context.close()
        log.info("post-processing drained (%d item(s) were waiting)", drained)
        stop.set()
        forget_worker(context.redis, name)
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python -m worker worker [--device D] [--name N]` and `python -m worker tiny-model DIR`."""
    import argparse

    parser = argparse.ArgumentParser(prog="kolors-farm", description="Kolors render worker")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run one render worker")
    worker.add_argument("--device", default=None)
    worker.add_argument("--name", default=None)
    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight checkpoint")
    tiny.add_argument("directory")
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "tiny-model":
        from pathlib import Path

        from worker.tiny import build_tiny_checkpoint

        print(build_tiny_checkpoint(Path(args.directory)))
        return
    sys.exit(run_worker(Settings(), args.device, args.name))
