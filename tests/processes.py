"""Real farm processes for tests: workers, the dispatcher, the API, a PostgreSQL cluster.

Each child logs to a file under the farm's data dir, so a failing test can show
what its processes said.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from control.processes import ChildSpec, Supervisor, free_port

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(
    condition: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1
) -> T:
    """Poll until `condition` returns a truthy value; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class FarmProcesses:
    """The farm's processes, started and stopped one by one (a test's kill is never undone)."""

    env: dict[str, str]
    logs: Path
    supervisor: Supervisor = field(default_factory=lambda: Supervisor(restart=False))
    api_url: str | None = None

    @property
    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        """Each started child's current process, by name."""
        return {
            name: child.proc
            for name, child in self.supervisor.children.items()
            if child.proc is not None
        }

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        child = self.supervisor.start(
            ChildSpec(name, [sys.executable, *argv], self.env, log_path=self.logs / f"{name}.log")
        )
        assert child.proc is not None
        return child.proc

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        """A render worker process on the CPU."""
        return self._start(name, ["-m", "worker", "worker", "--name", name])

    def start_dispatcher(self, name: str = "dispatcher") -> subprocess.Popen[bytes]:
        """A dispatcher process."""
        return self._start(name, ["-m", "control", "dispatcher"])

    def start_webhook_worker(self, name: str = "webhooks") -> subprocess.Popen[bytes]:
        """A webhook delivery worker process."""
        return self._start(name, ["-m", "control", "webhooks", "worker"])

    def start_api(self, args: Sequence[str] = ("--threads", "64")) -> str:
        """The API under gunicorn (`args` to `python -m api`); returns its URL once it answers."""
        port = free_port()
        self._start("api", ["-m", "api", "--port", str(port), *args])
        self.api_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(f"{self.api_url}/healthz"), 60, "the API to answer")
        return self.api_url

    def cli(self, *args: str) -> str:
        """Run `kolors-farm ARGS` against this farm; its stdout."""
        return subprocess.run(
            [sys.executable, "-m", "control", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout

    def create_user(self, name: str, credits: str, tenant: str | None = None) -> str:
        """A user made with the CLI; its API key."""
        args = ["users", "create", name, "--credits", credits]
        if tenant:
            args += ["--tenant", tenant]
        return self.cli(*args).strip().splitlines()[-1]

    def wait_for_workers(self, names: set[str], timeout_s: float = 120) -> None:
        """Until each named worker has loaded its model and sends heartbeats."""
        from shared.redis_client import make_redis
        from shared.scheduling.fleet import live_workers

        client = make_redis(self.env["KOLORS_FARM_REDIS_URL"])

        def ready() -> bool:
            for name in names:
                exited = self.procs[name].poll()
                assert exited is None, f"{name} exited with {exited}: {self.log(name)}"
            return names <= set(live_workers(client))

        wait_for(ready, timeout_s, f"workers {sorted(names)}", interval_s=0.2)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a child (and reap it, for SIGKILL and SIGTERM)."""
        self.supervisor.signal(name, sig)

    def log(self, name: str) -> str:
        """What a child wrote so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM every child, then SIGKILL the ones that linger."""
        self.supervisor.stop(grace_s=20)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def farm_env(
    data_dir: Path, database_url: str, redis_url: str, model_dir: Path, **settings: str
) -> dict[str, str]:
    """The environment of a farm's processes; `settings` are KOLORS_FARM_* overrides."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        KOLORS_FARM_DATA_DIR=str(data_dir),
        KOLORS_FARM_DATABASE_URL=database_url,
        KOLORS_FARM_REDIS_URL=redis_url,
        KOLORS_FARM_MODEL=str(model_dir),
        KOLORS_FARM_DEVICE="cpu",
        KOLORS_FARM_HEARTBEAT_INTERVAL_S="1",
    )
    env.update({f"KOLORS_FARM_{key.upper()}": value for key, value in settings.items()})
    return env


@dataclass
class PostgresCluster:
    """A PostgreSQL server of our own (initdb in a temp dir), so a test may stop it."""

    bin_dir: Path
    data_dir: Path
    port: int
    as_user: list[str]  # the prefix its tools run under (the postgres account, a host)
    host: str = "127.0.0.1"  # the one address it listens on

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl(
            "-w",
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            f"-p {self.port} -k {self.data_dir} -c listen_addresses={self.host} -c fsync=off",
            "start",
        )

    def stop(self) -> None:
        """Stop the server at once (in-flight connections are cut)."""
        self._pg_ctl("-w", "-m", "immediate", "stop")


def find_postgres_bin() -> Path | None:
    """The directory of `initdb` and `pg_ctl`, if PostgreSQL's server binaries are here."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return candidates[0].parent if candidates else None


def init_postgres_cluster(
    root: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    run_on: Sequence[str] = (),
    trusted_network: str | None = None,
) -> PostgresCluster:
    """initdb a new cluster under `root` (as the `postgres` user when running as root), started.

    It listens on `host` only, its tools run under the `run_on` prefix (a test host's
    namespace), and clients from `trusted_network` (a CIDR) are trusted like local ones.
    """
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    data_dir = root / "pgdata"
    as_user: list[str] = list(run_on)
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root; run its tools as the postgres account.
        shutil.chown(root, "postgres")
        as_user += ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres",
         "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    if trusted_network is not None:
        with (data_dir / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {trusted_network} trust\n")
    cluster = PostgresCluster(
        bin_dir=bin_dir, data_dir=data_dir, port=port or free_port(), as_user=as_user, host=host
    )
    cluster.start()
    return cluster
