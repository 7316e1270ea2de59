"""The commands that run the farm or one of its pieces in the foreground."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from shared.logs import configure_logging
from shared.settings import Settings


def _exec_module(module: str, *args: str) -> None:
    # This package imports neither the HTTP views nor the worker (torch): hand the process over.
    argv = [sys.executable, "-m", module, *args]
    os.execv(sys.executable, argv)  # noqa: S606 - our own interpreter, no shell


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="API bind address.")
@click.option("--port", default=8000, show_default=True, type=int, help="API port.")
@click.option(
    "--workers",
    "cpu_workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="CPU workers to start when no CUDA device is visible.",
)
def up(host: str, port: int, cpu_workers: int) -> None:
    """Run the whole farm on this machine in the foreground (Ctrl-C stops it).

    Applies migrations, starts a private Redis when KOLORS_FARM_REDIS_URL is unset,
    one worker per visible CUDA device (else --workers CPU workers), and the API.
    """
    from control.launcher import run_farm

    configure_logging()
    sys.exit(run_farm(Settings(), host=host, port=port, cpu_workers=cpu_workers))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="gunicorn worker processes.",
)
@click.option(
    "--threads",
    default=32,
    show_default=True,
    type=click.IntRange(1),
    help="Threads per process (each synchronous request holds one while it waits).",
)
def api(host: str, port: int, processes: int, threads: int) -> None:
    """Serve the HTTP API (gunicorn, threaded workers)."""
    _exec_module(
        "api",
        "--host",
        host,
        "--port",
        str(port),
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    )


@click.command()
@click.option(
    "--devices",
    default=None,
    help="Comma-separated CUDA device indices to serve (default: every visible device).",
)
@click.option(
    "--cpu-workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="CPU workers to start when no CUDA device is visible.",
)
def workers(devices: str | None, cpu_workers: int) -> None:
    """Run one render worker per device, each pinned to its GPU, restarted with backoff if it dies.

    Each worker sees only its own device (CUDA_VISIBLE_DEVICES) and is named gpuN@host.
    """
    import socket

    from control.workers import run_workers, select_devices, visible_cuda_devices, worker_plan

    configure_logging()
    visible = visible_cuda_devices()
    try:
        chosen = select_devices(visible, devices)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--devices") from exc
    plan = worker_plan(chosen, cpu_workers, socket.gethostname())
    sys.exit(run_workers(plan, dict(os.environ)))


@click.command()
def dispatcher() -> None:
    """Release queued jobs to the workers in fair-share order and recover lost work.

    Run one or more (one is active at a time; the others stand by).
    """
    from control.dispatcher import run_dispatcher

    configure_logging()
    sys.exit(run_dispatcher(Settings()))


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--device", default=None, help="cuda:N, cpu or auto (default: KOLORS_FARM_DEVICE, else auto)."
)
@click.option("--name", default=None, help="Celery node name (default: <device>@<host>).")
def worker(device: str | None, name: str | None) -> None:
    """Run one render worker (one process per device); exits non-zero if the model fails to load."""
    args = ["worker"]
    if device:
        args += ["--device", device]
    if name:
        args += ["--name", name]
    _exec_module("worker", *args)


@click.command()
def migrate() -> None:
    """Apply database migrations."""
    from shared.migrate import migrate_database

    configure_logging()
    migrate_database(Settings().resolved_database_url)
    click.echo("database is up to date")


@click.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def tiny_model(directory: Path) -> None:
    """Write a tiny random-weight Kolors checkpoint (its images are noise) to DIRECTORY."""
    _exec_module("worker", "tiny-model", str(directory))


@click.command("worker")
@click.option("--name", default=None, help="Celery node name (default: webhooks-<pid>@<host>).")
def webhooks_worker(name: str | None) -> None:
    """Deliver webhooks (their own queue, no GPU) and sweep the outbox for due deliveries."""
    from control.deliveries import run_delivery_worker

    configure_logging()
    sys.exit(run_delivery_worker(Settings(), name))
