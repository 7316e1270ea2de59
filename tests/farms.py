"""Farms of real processes for tests, from one factory, and the Redis databases they run on.

A farm is the tiny checkpoint served the way production serves Kolors: Celery render
workers on the CPU, the dispatcher, the API under gunicorn and, when asked, the webhook
delivery worker, on a database of its own (a new SQLite file unless told otherwise) and a
Redis database of its own. Tests get farms from the `module_farms` fixture (farms that run
until the module's last test is done) or the `farms` fixture (until the test is done);
both are a `FarmFactory`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.processes import FarmProcesses, farm_env


class RedisDatabases:
    """The databases of one Redis server, handed out one holder at a time.

    Each holder gets a database that nobody else holds, emptied (FLUSHDB) as it is handed
    out, so nothing a test does to Redis reaches another and nothing flushes the whole
    server. Database 0 is never handed out: it stays the server's plain URL. Released
    databases are handed out again last, oldest first.
    """

    def __init__(self, server_url: str) -> None:
        client = redis.Redis.from_url(server_url)
        try:
            count = int(client.config_get("databases")["databases"] or 16)
        finally:
            client.close()
        self._base = server_url.rsplit("/", 1)[0]
        self._free = deque(range(1, count))
        self._held: set[int] = set()

    def acquire(self) -> str:
        """The URL of a database nobody holds, emptied."""
        if not self._free:
            raise RuntimeError(
                f"all {len(self._held)} Redis databases are held: release some "
                f"(held: {sorted(self._held)})"
            )
        number = self._free.popleft()
        self._held.add(number)
        url = f"{self._base}/{number}"
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        finally:
            client.close()
        return url

    def release(self, url: str) -> None:
        """Give back a database `acquire` handed out."""
        number = int(url.rsplit("/", 1)[1])
        self._held.remove(number)
        self._free.append(number)

    @contextmanager
    def database(self) -> Iterator[str]:
        """A database held until the block ends."""
        url = self.acquire()
        try:
            yield url
        finally:
            self.release(url)


@dataclass
class RunningFarm:
    """A farm a `FarmProcesses` runs, and what it runs on."""

    processes: FarmProcesses
    data_dir: Path
    database_url: str
    redis_url: str
    workers: tuple[str, ...]
    redis_lender: RedisDatabases | None = None  # where `redis_url` goes back when it stops
    stopped: bool = False

    @property
    def url(self) -> str:
        """The API's URL."""
        assert self.processes.api_url is not None, "this farm runs no API"
        return self.processes.api_url

    @property
    def env(self) -> dict[str, str]:
        """The environment of the farm's processes."""
        return self.processes.env

    def stop(self) -> None:
        """Stop every process of the farm and give back its Redis database (once)."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.processes.stop_all()
        finally:
            if self.redis_lender is not None:
                self.redis_lender.release(self.redis_url)


class FarmFactory:
    """Starts farms with `start`; `close` stops every one not stopped yet."""

    def __init__(
        self,
        redis_databases: RedisDatabases,
        model_dir: Path,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> None:
        self._redis_databases = redis_databases
        self._model_dir = model_dir
        self._tmp_path_factory = tmp_path_factory
        self._started: list[RunningFarm] = []

    def start(
        self,
        name: str,
        *,
        workers: int | Sequence[str] = 1,
        dispatcher: bool = True,
        api: bool = True,
        api_args: Sequence[str] = ("--threads", "64"),
        webhook_worker: bool = False,
        settings: Mapping[str, str] | None = None,
        database_url: str | None = None,
        redis_url: str | None = None,
        migrate: bool = True,
    ) -> RunningFarm:
        """Start a farm, its data in a new temp dir named after `name`; once it serves.

        - `workers`: the render workers' names, or how many (named NAME-cpu0, NAME-cpu1, ...);
          `start` returns once each has loaded the tiny checkpoint and sends heartbeats;
        - `dispatcher`, `api`, `webhook_worker`: whether each runs (the API with `api_args`
          to `python -m api`; the webhook worker is named "webhooks");
        - `settings`: KOLORS_FARM_* overrides, {"cache": "false"} for KOLORS_FARM_CACHE=false;
        - `database_url`: the farm's database (a new SQLite file in its data dir if None),
          migrated first with `kolors-farm migrate` unless `migrate` is false;
        - `redis_url`: the farm's Redis (a database of the session's scratch server of its
          own, emptied, if None).
        """
        data_dir = self._tmp_path_factory.mktemp(name)
        names = (
            tuple(f"{name}-cpu{index}" for index in range(workers))
            if isinstance(workers, int)
            else tuple(workers)
        )
        lender = self._redis_databases if redis_url is None else None
        redis_url = redis_url or self._redis_databases.acquire()
        database_url = database_url or f"sqlite:///{data_dir / 'farm.db'}"
        env = farm_env(data_dir, database_url, redis_url, self._model_dir, **(settings or {}))
        processes = FarmProcesses(env=env, logs=data_dir / "logs")
        farm = RunningFarm(processes, data_dir, database_url, redis_url, names, lender)
        self._started.append(farm)
        try:
            if migrate:
                processes.cli("migrate")
            for worker in names:
                processes.start_worker(worker)
            if dispatcher:
                processes.start_dispatcher()
            if webhook_worker:
                processes.start_webhook_worker()
            if api:
                processes.start_api(api_args)
            if names:
                processes.wait_for_workers(set(names))
        except BaseException:
            farm.stop()
            raise
        return farm

    def close(self) -> None:
        """Stop every farm this factory started (the last started first)."""
        for farm in reversed(self._started):
            farm.stop()
        self._started.clear()
