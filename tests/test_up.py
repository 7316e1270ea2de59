"""`kolors-farm up` under faults: its children killed with SIGKILL, on real processes.

Each test runs `python -m control up` on the tiny checkpoint with SQLite under a
temp data dir and up's own private Redis, kills one child, and checks that up
restarts it while the rest of the farm goes on, and that SIGTERM then stops up
with exit code 0 and no process of the farm left behind. The last test checks
that up gives up, with exit code 1 and a message naming the child, when a child
keeps dying as it starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select

from control.launcher import GIVE_UP_AFTER
from control.processes import free_port
from shared.accounts.ledger import get_balance, held_for_job, ledger_balance
from shared.db import make_engine, make_session_factory, transaction
from shared.models import Job, JobImage, LedgerEntry, LedgerKind
from tests.processes import wait_for

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parent.parent
FAST_RECOVERY = {
    # A dead worker's job is requeued 3 s after its last lease renewal.
    "KOLORS_FARM_LEASE_S": "3",
    "KOLORS_FARM_DISPATCH_INTERVAL_S": "0.5",
    # Heartbeats expire 1.5 s after a worker dies, so /readyz shows its successor quickly.
    "KOLORS_FARM_HEARTBEAT_INTERVAL_S": "0.5",
    "KOLORS_FARM_PROGRESS_INTERVAL_S": "0.2",
    "KOLORS_FARM_REDISPATCH_AFTER_S": "2",
}
# 0.3 credits an image (512x512 is a quarter of the reference, at 30 steps instead of 25);
# about a second an image on two idle cores, many times that on busy ones.
SLOW_JOB = {"prompt": "a fox", "width": 512, "height": 512, "steps": 30, "number_of_images": 3}
QUICK = {"prompt": "a fox", "width": "512", "height": "512", "steps": "2"}  # 0.02 credits

# A process: its pid and its start time (so a reused pid is never taken for it).
ProcId = tuple[int, str]


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat from the state on (field 3), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after its last ")" do not.
    return stat.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    """The start time of a live, non-zombie process `pid`, else None."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def proc_id(pid: int) -> ProcId | None:
    start = _start_time(pid)
    return (pid, start) if start is not None else None


def alive(proc: ProcId) -> bool:
    return _start_time(proc[0]) == proc[1]


def _children_by_parent() -> dict[int, list[int]]:
    # One pass over /proc (no pgrep per process): the tests poll this while the farm
    # starts, and two cores have no time to spare for it.
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def children(pid: int) -> list[int]:
    return _children_by_parent().get(pid, [])


def descendants(pid: int) -> list[ProcId]:
    """Every live process below `pid` (up's children start their own sessions)."""
    tree = _children_by_parent()
    found: list[ProcId] = []
    pending = [pid]
    while pending:
        for child in tree.get(pending.pop(), []):
            ident = proc_id(child)
            if ident is not None:
                found.append(ident)
                pending.append(child)
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def is_api(pid: int) -> bool:
    return cmdline(pid)[1:3] == ["-m", "api"]


def is_worker(pid: int) -> bool:
    return cmdline(pid)[1:4] == ["-m", "worker", "worker"]


def is_redis(pid: int) -> bool:
    # redis-server rewrites its command line into a title; its name stays.
    return comm(pid) == "redis-server"


@dataclass
class Up:
    """A running `kolors-farm up`, its output file and its API."""

    proc: subprocess.Popen[bytes]
    output: Path
    port: int
    env: dict[str, str]
    # Every process of the farm seen so far: what teardown kills if up left any behind.
    seen: set[ProcId] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return Path(self.env["KOLORS_FARM_DATA_DIR"])

    def text(self) -> str:
        """What up and its children printed so far."""
        return self.output.read_text(errors="replace")

    def tail(self) -> str:
        return self.text()[-4000:]

    def wait_banner(self, timeout_s: float = 120) -> None:
        def banner() -> bool:
            assert self.proc.poll() is None, f"up exited early:\n{self.tail()}"
            return f"Kolors render farm is up at {self.url}" in self.text()

        wait_for(banner, timeout_s, "up to print its banner", interval_s=0.2)
        self.farm()

    def child(self, match: Callable[[int], bool]) -> int | None:
        """The pid of up's one live direct child that `match` picks."""
        found = [pid for pid in children(self.proc.pid) if proc_id(pid) is not None and match(pid)]
        assert len(found) <= 1, found
        return found[0] if found else None

    def successor(self, match: Callable[[int], bool], old: int) -> int | None:
        """The matching child, once it is another process than `old`."""
        pid = self.child(match)
        return pid if pid != old else None

    def create_user(self, name: str, credits: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "control", "users", "create", name, "--credits", credits],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        return out.strip().splitlines()[-1]

    def assert_running(self) -> None:
        assert self.proc.poll() is None, f"up exited with {self.proc.returncode}:\n{self.tail()}"

    def farm(self) -> list[ProcId]:
        """up's processes now (and remembered, for teardown)."""
        found = descendants(self.proc.pid)
        self.seen.update(found)
        return found

    def left_behind(self) -> list[tuple[int, list[str]]]:
        """The processes of the farm ever seen that are still alive."""
        return [(proc[0], cmdline(proc[0])) for proc in self.seen if alive(proc)]

    def stop_cleanly(self) -> None:
        """SIGTERM: up exits 0 and every process of the farm is gone."""
        self.assert_running()
        farm = self.farm()
        assert len(farm) >= 4, farm  # redis, a worker, the dispatcher, the API (and its worker)
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.tail()
        # up waits for each child it stops, and gunicorn for its own worker.
        time.sleep(0.5)
        assert self.left_behind() == []


@pytest.fixture
def up_env(tmp_path: Path, tiny_model_dir: Path) -> dict[str, str]:
    # Nothing from the caller's KOLORS_FARM_* settings: up must start its own Redis and SQLite.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_FARM_")}
    return (
        env
        | FAST_RECOVERY
        | {
            "PYTHONPATH": str(REPO),
            "KOLORS_FARM_DATA_DIR": str(tmp_path / "var"),
            "KOLORS_FARM_MODEL": str(tiny_model_dir),
            # CPU workers on any machine, so each test knows its one worker.
            "CUDA_VISIBLE_DEVICES": "",
        }
    )


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Up]]:
    """Starts `up`; whatever a test leaves running is killed, children first."""
    started: list[Up] = []

    def start(env: dict[str, str]) -> Up:
        output = tmp_path / f"up-{len(started)}.log"
        port = free_port()
        # A file, not a pipe: the children inherit it, and a pipe nobody reads would
        # block them once full (gunicorn logs every /healthz poll).
        with output.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "control", "up", "--port", str(port)],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        up = Up(proc=proc, output=output, port=port, env=env)
        started.append(up)
        return up

    try:
        yield start
    finally:
        for up in started:
            if up.proc.poll() is None:
                # Collected before up dies: its children are in their own sessions and
                # would be orphaned (unreachable by killpg) once it is gone.
                up.farm()
                os.killpg(up.proc.pid, signal.SIGKILL)
                up.proc.wait(timeout=30)
            for pid, _argv in up.left_behind():
                os.kill(pid, signal.SIGKILL)
            print(f"--- output of up ({up.output}) ---\n{up.tail()}")


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def redis_pid(client: redis.Redis) -> int | None:
    """The pid of the Redis server that answers, if one does."""
    try:
        return int(client.info("server")["process_id"])
    except redis.RedisError:
        return None


def readyz(up: Up) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{up.url}/readyz", timeout=10).json()
    return body


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class HealthPoller:
    """GET /healthz every 100 ms on a fresh connection; records each answer and failure."""

    url: str
    ok_at: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                response = httpx.get(f"{self.url}/healthz", timeout=5)
            except httpx.HTTPError as exc:
                self.failures.append(f"{time.monotonic():.1f}: {exc!r}")
                continue
            if response.status_code == 200:
                self.ok_at.append(time.monotonic())
            else:
                self.failures.append(f"{time.monotonic():.1f}: {response.status_code}")

    def __enter__(self) -> HealthPoller:
        self._thread = threading.Thread(target=self._run, daemon=True, name="healthz")
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)


def test_a_worker_killed_mid_render_is_restarted_and_the_job_is_charged_once(
    start_up: Callable[[dict[str, str]], Up], up_env: dict[str, str]
) -> None:
    up = start_up(up_env)
    up.wait_banner()
    headers = {"x-api-key": up.create_user("ann", "10")}
    with HealthPoller(up.url) as health:
        response = httpx.post(f"{up.url}/v2/kolors", json=SLOW_JOB, headers=headers, timeout=30)
        assert response.status_code == 202, response.text
        job_id = response.json()["request_id"]
        status_url = f"{up.url}/v2/requests/{job_id}/status"

        def mid_render() -> bool:
            body: dict[str, Any] = httpx.get(status_url, headers=headers, timeout=10).json()
            assert body["status"] in ("QUEUED", "PROCESSING"), f"ended unkilled: {body}"
            progress = body["progress"]
            # Past the first stored (and charged) image, inside a later one: the kill then
            # tests both that the delivered image is kept and paid once, and that the rest
            # is rendered again. A final step of 30/30 may be the last image's, so not that.
            return bool(
                body["status"] == "PROCESSING"
                and 1 <= progress["images_done"] < progress["images"]
                and 0 < progress["step"] < progress["steps"]
            )

        wait_for(mid_render, 120, "the job to be mid-render", interval_s=0.1)
        workers = readyz(up)["workers"]
        assert len(workers) == 1, workers
        ((name, info),) = workers.items()
        victim = int(info["pid"])
        assert victim == up.child(is_worker), (victim, workers)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        def successor() -> int | None:
            listed = readyz(up)["workers"].get(name)
            pid = int(listed["pid"]) if listed else None
            return pid if pid not in (None, victim) and pid == up.child(is_worker) else None

        # One second of backoff, then the model loads again and the worker warms up.
        wait_for(successor, 60, f"up to restart {name}", interval_s=0.2)
        restarted_at = time.monotonic()

        def completed() -> bool:
            body: dict[str, Any] = httpx.get(status_url, headers=headers, timeout=10).json()
            assert body["status"] != "FAILED", body
            return bool(body["status"] == "COMPLETED")

        wait_for(completed, 180, "the job to complete", interval_s=0.3)
        up.assert_running()
    assert health.failures == [], health.failures
    # The API answered while the worker was dead and loading again, not just around it.
    assert any(killed_at < t < restarted_at for t in health.ok_at), (killed_at, restarted_at)

    result = httpx.get(f"{up.url}/v2/requests/{job_id}", headers=headers, timeout=30)
    assert result.status_code == 200 and len(result.json()["output"]) == 3
    assert result.headers["x-remaining-credits"] == "9.1"
    balance = httpx.get(f"{up.url}/v1/get-user-credits", headers=headers, timeout=30)
    assert balance.json() == {"credits": "9.1"}

    engine = make_engine(f"sqlite:///{up.data_dir / 'farm.db'}")
    try:
        with transaction(make_session_factory(engine)) as session:
            job = session.get_one(Job, job_id)
            # Attempt 2: the kill did interrupt the render, and the lease recovered the job.
            assert (job.state, job.attempt, job.images_done) == ("COMPLETED", 2, 3)
            images = session.scalars(select(JobImage).where(JobImage.job_id == job_id)).all()
            assert sorted(image.index for image in images) == [0, 1, 2]
            # What the dead worker stored is kept; its successor rendered only the rest.
            assert {image.attempt for image in images} == {1, 2}
            kinds = list(
                session.scalars(select(LedgerEntry.kind).where(LedgerEntry.job_id == job_id))
            )
            assert kinds.count(LedgerKind.CAPTURE.value) == 3, kinds
            assert kinds.count(LedgerKind.HOLD.value) == 1, kinds
            assert held_for_job(session, job_id) == 0
            assert get_balance(session, job.user_id) == ledger_balance(session, job.user_id) == 9100
    finally:
        engine.dispose()
    up.stop_cleanly()


def test_the_api_killed_is_restarted_on_the_same_port(
    start_up: Callable[[dict[str, str]], Up], up_env: dict[str, str]
) -> None:
    up = start_up(up_env)
    up.wait_banner()
    headers = {"x-api-key": up.create_user("ann", "1")}
    victim = up.child(is_api)
    assert victim is not None
    gunicorn_workers = descendants(victim)
    up.seen.update(gunicorn_workers)  # orphans once the API dies: no longer below up
    assert gunicorn_workers, "the API has no gunicorn worker"
    os.kill(victim, signal.SIGKILL)
    # The orphaned gunicorn worker still holds the listening socket until it notices its
    # master is gone; only once it has left can an answer come from the new API alone.
    wait_for(
        lambda: not any(alive(proc) for proc in gunicorn_workers),
        30,
        "the killed API's gunicorn worker to exit",
    )
    successor = wait_for(lambda: up.successor(is_api, victim), 30, "up to restart the API")
    wait_for(lambda: answers(f"{up.url}/healthz"), 60, "the new API to answer", interval_s=0.2)
    assert up.child(is_api) == successor
    assert descendants(successor), "the new API has no gunicorn worker"
    up.assert_running()
    assert "api exited with -9" in up.text()
    credits = httpx.get(f"{up.url}/v1/get-user-credits", headers=headers, timeout=30)
    assert credits.status_code == 200 and credits.json() == {"credits": "1"}
    render = httpx.post(f"{up.url}/v1/kolors", data=QUICK, headers=headers, timeout=120)
    assert render.status_code == 200, render.text
    assert render.headers["x-remaining-credits"] == "0.98"
    up.stop_cleanly()


def test_the_private_redis_killed_is_restarted_on_the_same_port(
    start_up: Callable[[dict[str, str]], Up], up_env: dict[str, str]
) -> None:
    up = start_up(up_env)
    up.wait_banner()
    headers = {"x-api-key": up.create_user("ann", "1")}
    victim = up.child(is_redis)
    assert victim is not None
    worker = up.child(is_worker)
    assert worker is not None
    # The URL every child was given: the one a restarted Redis has to come back on.
    client = redis.Redis.from_url(environ(worker)["KOLORS_FARM_REDIS_URL"], socket_timeout=2)
    assert redis_pid(client) == victim
    os.kill(victim, signal.SIGKILL)
    successor = wait_for(lambda: up.successor(is_redis, victim), 30, "up to restart Redis")
    wait_for(lambda: redis_pid(client) == successor, 30, "the new Redis to answer on that URL")
    assert "redis exited with -9" in up.text()
    # The workers and the dispatcher reconnect by themselves: a new request renders.
    render = httpx.post(f"{up.url}/v1/kolors", data=QUICK, headers=headers, timeout=90)
    assert render.status_code == 200, render.text
    assert render.headers["x-remaining-credits"] == "0.98"
    assert up.child(is_redis) == successor
    up.assert_running()
    up.stop_cleanly()


def test_up_gives_up_when_a_worker_keeps_dying_at_start(
    start_up: Callable[[dict[str, str]], Up], up_env: dict[str, str], tmp_path: Path
) -> None:
    env = up_env | {"KOLORS_FARM_MODEL": str(tmp_path / "no-such-model"), "HF_HUB_OFFLINE": "1"}
    up = start_up(env)
    # Five starts (each imports torch before it fails: 5 to 20 s on two busy cores) and
    # backoffs of 1+2+4+8 s.
    deadline = time.monotonic() + 180
    # Surveyed throughout, not at the end: the worker is a new process after each restart.
    while up.proc.poll() is None:
        assert time.monotonic() < deadline, f"up is still running:\n{up.tail()}"
        up.farm()
        time.sleep(0.5)
    assert up.proc.returncode == 1, up.tail()
    output = up.text()
    worker = f"cpu0@{socket.gethostname()}"
    assert (
        f"{worker} keeps exiting soon after it starts ({GIVE_UP_AFTER} times in a row, "
        "last exit code 1); stopping the farm" in output
    ), output[-4000:]
    assert "could not load the Kolors pipeline" in output
    # Restarted after each exit but the last, which ends the farm instead.
    assert output.count(f"{worker} exited with 1") == GIVE_UP_AFTER - 1
    assert "Kolors render farm is up" not in output
    assert len(up.seen) >= 4, up.seen  # redis, the dispatcher, the API and a worker at least
    time.sleep(0.5)
    assert up.left_behind() == []
