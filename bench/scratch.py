"""A scratch farm for the benchmarks: a private Redis, farm processes, a user, readiness.

The benchmarks are scripts (`.venv/bin/python bench/NAME.py`): each puts the repository
root first on sys.path, then imports this module as `bench.scratch`, as mypy names it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from control.launcher import RedisServer, start_scratch_redis
from control.processes import Child, ChildSpec, Supervisor, free_port
from shared.accounts.users import create_user
from shared.db import make_engine, make_session_factory, transaction
from shared.migrate import migrate_database

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def scratch_redis(data_dir: Path) -> Iterator[RedisServer]:
    """A private redis-server that persists nothing, stopped when the block ends."""
    server = start_scratch_redis(data_dir)
    try:
        yield server
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)


def farm_env(data_dir: Path, database_url: str, redis_url: str, **settings: str) -> dict[str, str]:
    """The environment of a farm's processes; `settings` are KOLORS_FARM_* overrides."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        KOLORS_FARM_DATA_DIR=str(data_dir),
        KOLORS_FARM_DATABASE_URL=database_url,
        KOLORS_FARM_REDIS_URL=redis_url,
    )
    env.update({f"KOLORS_FARM_{key.upper()}": value for key, value in settings.items()})
    return env


def bench_user(database_url: str, millicredits: int = 10**9) -> str:
    """Migrate the database, create the user "bench" (tenant "bench"); its API key."""
    migrate_database(database_url)
    engine = make_engine(database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            _, key = create_user(session, "bench", "bench", millicredits)
    finally:
        engine.dispose()
    return key


def wait_healthy(base_url: str, log: Path, timeout_s: float = 60) -> None:
    """Until `GET /healthz` answers 200; RuntimeError with the log's tail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise RuntimeError(f"the API at {base_url} did not answer: {tail}")
        time.sleep(0.2)


class ScratchFarm:
    """Farm processes (`python -m ...`) under one supervisor, each logging to `logs/NAME.log`."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.supervisor = Supervisor(restart=False)

    def start(self, name: str, *argv: str) -> Child:
        """Start `python ARGV` as the child `name`."""
        spec = ChildSpec(
            name, [sys.executable, *argv], self.env, log_path=self.logs / f"{name}.log"
        )
        return self.supervisor.start(spec)

    def start_api(self, *args: str) -> tuple[str, int]:
        """The API under gunicorn (`args` to `python -m api`), once it answers: URL and pid."""
        port = free_port()
        child = self.start("api", "-m", "api", "--port", str(port), *args)
        assert child.proc is not None
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, self.logs / "api.log")
        return url, child.proc.pid

    def stop(self, grace_s: float = 10) -> None:
        """SIGTERM every child, then SIGKILL the ones that linger."""
        self.supervisor.stop(grace_s=grace_s)


@contextmanager
def scratch_farm(env: dict[str, str], logs: Path) -> Iterator[ScratchFarm]:
    """A `ScratchFarm` whose children are stopped when the block ends."""
    farm = ScratchFarm(env, logs)
    try:
        yield farm
    finally:
        farm.stop()
