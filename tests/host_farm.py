"""A farm spread over test hosts (tests/hosts.py), as production spreads it over machines.

- the **data host** runs PostgreSQL (a fresh cluster of Debian's server binaries, run as
  the `postgres` account), Redis and an S3 endpoint (moto's server);
- the **API host** runs the API under gunicorn and the dispatcher;
- each **worker host** runs `kolors-farm worker` on its own copy of the tiny checkpoint;
- the root namespace is the client.

Every process is configured with the other hosts' addresses only: no farm process is
told of a loopback address, a shared database file or a shared folder (each host has a
data dir of its own; results go to S3). Worker hosts may run with a wrong clock
(libfaketime), to show that leases, deadlines and retention follow the database's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from control.launcher import redis_argv, redis_server_binary
from control.processes import ChildSpec, Supervisor
from shared.db import make_engine, make_session_factory
from shared.redis_client import make_redis
from shared.scheduling.fleet import live_workers
from tests.hosts import Host, HostNetwork
from tests.processes import REPO, PostgresCluster, init_postgres_cluster, wait_for

POSTGRES_PORT = 5432
REDIS_PORT = 6379
S3_PORT = 9000
API_PORT = 8000
BUCKET = "kolors-results"
FAKETIME_LIBRARY = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
FAKETIME_SITE = Path(__file__).parent / "faketime_site"


def faketime_env(offset_s: int) -> dict[str, str]:
    """The environment that runs a process with its wall clock `offset_s` off (libfaketime).

    The monotonic clock stays true, as on a real host whose wall clock is wrong (and
    because Python's timed waits run on it: a faked one would stretch every wait).
    """
    return {
        "LD_PRELOAD": str(FAKETIME_LIBRARY),
        "FAKETIME": f"{offset_s:+d}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        # time.sleep fails under that setting; this folder's sitecustomize replaces it.
        "PYTHONPATH": f"{FAKETIME_SITE}{os.pathsep}{REPO}",
    }


def _base_env() -> dict[str, str]:
    """This process's environment without any farm or AWS setting (each host sets its own)."""
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KOLORS_FARM_", "AWS_", "PYTEST_"))
    }
    return inherited | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class HostFarm:
    """The farm's hosts and processes; `close` stops them and removes the hosts."""

    network: HostNetwork
    data: Host
    api: Host
    workers: dict[str, Host]  # worker host name -> host
    model_dir: Path
    clock_offsets: Mapping[str, int] = field(default_factory=dict)  # worker host -> seconds
    settings: Mapping[str, str] = field(default_factory=dict)  # KOLORS_FARM_* overrides
    supervisor: Supervisor = field(default_factory=lambda: Supervisor(restart=False))
    postgres: PostgresCluster | None = None
    _engine: Engine | None = None
    _postgres_root: Path | None = None

    # --- where things are -------------------------------------------------------------

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.data.address}:{POSTGRES_PORT}/kolors"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.data.address}:{REDIS_PORT}/0"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.data.address}:{S3_PORT}"

    @property
    def url(self) -> str:
        """The API's URL, as clients reach it."""
        return f"http://{self.api.address}:{API_PORT}"

    def worker_name(self, host: Host) -> str:
        """The render worker's name on `host` (one CPU device)."""
        return f"{host.name}-cpu0"

    def s3(self) -> object:
        """A boto3 S3 client on the data host's endpoint."""
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id="farm",
            aws_secret_access_key="farm-secret",
            region_name="us-east-1",
        )

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Sessions on the farm's database, from the client (for assertions and audits)."""
        if self._engine is None:
            self._engine = make_engine(self.database_url)
        return make_session_factory(self._engine)

    def redis(self) -> redis.Redis:
        """A client of the farm's Redis."""
        return make_redis(self.redis_url)

    def env_for(self, host: Host) -> dict[str, str]:
        """The environment of a farm process on `host`: the other hosts by address only."""
        env = _base_env() | {
            "KOLORS_FARM_DATA_DIR": str(host.root / "var"),
            "KOLORS_FARM_DATABASE_URL": self.database_url,
            "KOLORS_FARM_REDIS_URL": self.redis_url,
            "KOLORS_FARM_STORAGE_URL": f"s3://{BUCKET}/farm",
            "KOLORS_FARM_PUBLIC_BASE_URL": self.url,
            "KOLORS_FARM_MODEL": str(host.root / "model"),
            "KOLORS_FARM_DEVICE": "cpu",
            "KOLORS_FARM_HEARTBEAT_INTERVAL_S": "1",
            "KOLORS_FARM_SYNC_TIMEOUT_S": "120",
            "KOLORS_FARM_STORE_RETRY_S": "10",
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "farm",
            "AWS_SECRET_ACCESS_KEY": "farm-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        env |= self.settings
        if host.name in self.clock_offsets:
            env |= faketime_env(self.clock_offsets[host.name])
        return env

    # --- processes ---------------------------------------------------------------------

    def _start(self, host: Host, name: str, argv: list[str]) -> None:
        spec = ChildSpec(
            f"{host.name}/{name}",
            host.command(argv),
            self.env_for(host),
            log_path=host.root / "logs" / f"{name}.log",
        )
        self.supervisor.start(spec)

    def log(self, host: Host, name: str) -> str:
        """What a process on `host` wrote so far."""
        path = host.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def running(self, host: Host, name: str) -> bool:
        """Whether the process `name` on `host` runs."""
        child = self.supervisor.children.get(f"{host.name}/{name}")
        return child is not None and child.proc is not None and child.proc.poll() is None

    def kill(self, host: Host, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the process `name` on `host` (and reap it, for KILL and TERM)."""
        self.supervisor.signal(f"{host.name}/{name}", sig)

    def start_postgres(self) -> None:
        """Create and start the data host's PostgreSQL cluster, and the farm's database."""
        # Its own top-level folder: the postgres account cannot enter a test's private temp dir.
        self._postgres_root = Path(tempfile.mkdtemp(prefix="kolors-farm-data-pg-"))
        self.postgres = init_postgres_cluster(
            self._postgres_root,
            host=self.data.address,
            port=POSTGRES_PORT,
            run_on=self.data.command([]),
            trusted_network=str(self.network.subnet),
        )
        admin = make_engine(self.postgres.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql('CREATE DATABASE "kolors"')
        admin.dispose()

    def start_redis(self) -> None:
        """The data host's Redis, empty and persisting nothing; once it answers."""
        argv = redis_argv(redis_server_binary(), REDIS_PORT, self.data.root)
        argv[argv.index("--bind") + 1] = self.data.address
        argv[argv.index("--appendonly") + 1] = "no"
        argv[argv.index("--protected-mode") + 1] = "no"
        self._start(self.data, "redis", argv)
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        wait_for(lambda: _pings(client), 20, "the data host's Redis")
        client.close()

    def start_s3(self) -> None:
        """moto's S3 server on the data host, with the results bucket."""
        argv = [sys.executable, "-m", "moto.server", "-H", self.data.address, "-p", str(S3_PORT)]
        self._start(self.data, "s3", argv)
        wait_for(lambda: _answers(f"{self.s3_endpoint}/moto-api/"), 30, "the S3 endpoint")
        self.s3().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]

    def migrate(self) -> None:
        """`kolors-farm migrate`, run on the API host."""
        result = self.api.run(*_with_env(self.env_for(self.api)), sys.executable, "-m", "control",
                              "migrate")  # fmt: skip
        assert result.returncode == 0, result.stderr

    def start_api(self) -> None:
        """The API under gunicorn on the API host; once it answers the client."""
        argv = [sys.executable, "-m", "api", "--host", self.api.address, "--port", str(API_PORT),
                "--threads", "32"]  # fmt: skip
        self._start(self.api, "api", argv)
        wait_for(lambda: _answers(f"{self.url}/healthz"), 60, "the API host to answer")

    def start_dispatcher(self) -> None:
        """The dispatcher on the API host."""
        self._start(self.api, "dispatcher", [sys.executable, "-m", "control", "dispatcher"])

    def start_worker(self, host: Host) -> None:
        """The render worker on a worker host (its model copied there first)."""
        if not (host.root / "model").exists():
            shutil.copytree(self.model_dir, host.root / "model")
        argv = [sys.executable, "-m", "worker", "worker", "--name", self.worker_name(host)]
        self._start(host, "worker", argv)

    def wait_for_workers(self, hosts: list[Host], timeout_s: float = 180) -> None:
        """Until the workers of `hosts` have loaded their model and send heartbeats."""
        names = {self.worker_name(host) for host in hosts}
        client = self.redis()

        def ready() -> bool:
            for host in hosts:
                assert self.running(host, "worker"), self.log(host, "worker")[-3000:]
            try:
                return names <= set(live_workers(client))
            except redis.RedisError:
                return False

        try:
            wait_for(ready, timeout_s, f"workers {sorted(names)}", interval_s=0.3)
        finally:
            client.close()

    def create_user(self, name: str, credits: str, tenant: str | None = None) -> str:
        """A user made with `kolors-farm users create` on the API host; its API key."""
        argv = [
            "users",
            "create",
            name,
            "--credits",
            credits,
            *(["--tenant", tenant] if tenant else []),
        ]
        result = self.api.run(*_with_env(self.env_for(self.api)), sys.executable, "-m", "control",
                              *argv)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def close(self) -> None:
        """Stop every process, then remove every host, link and the bridge."""
        try:
            if self._engine is not None:
                self._engine.dispose()
            self.supervisor.stop(grace_s=10)
            if self.postgres is not None:
                # The namespace's removal kills it anyway.
                with contextlib.suppress(Exception):
                    self.postgres.stop()
        finally:
            self.network.close()
            if self._postgres_root is not None:
                shutil.rmtree(self._postgres_root, ignore_errors=True)


def _with_env(env: Mapping[str, str]) -> list[str]:
    """`env VAR=VALUE ...`: a one-off command on a host with the farm's environment."""
    return ["env", "-i", *(f"{key}={value}" for key, value in env.items())]


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def start_host_farm(
    root: Path,
    model_dir: Path,
    clock_offsets: Mapping[str, int] | None = None,
    settings: Mapping[str, str] | None = None,
) -> HostFarm:
    """Build the hosts and start the farm on them; once both workers send heartbeats.

    `clock_offsets`: worker host name -> seconds its wall clock is off; `settings`:
    environment overrides for every farm process (KOLORS_FARM_HEARTBEAT_INTERVAL_S: "5").
    """
    network = HostNetwork(root)
    try:
        data = network.add_host("data")
        api = network.add_host("api")
        workers = {name: network.add_host(name) for name in ("worker-a", "worker-b")}
    except BaseException:
        network.close()
        raise
    farm = HostFarm(
        network, data, api, workers, model_dir, dict(clock_offsets or {}), dict(settings or {})
    )
    try:
        farm.start_postgres()
        farm.start_redis()
        farm.start_s3()
        farm.migrate()
        for host in workers.values():
            farm.start_worker(host)
        farm.start_dispatcher()
        farm.start_api()
        farm.wait_for_workers(list(workers.values()))
    except BaseException:
        farm.close()
        raise
    return farm
