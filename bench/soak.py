"""A soak: a one-host farm of real processes under steady mixed load while its processes die.

The farm is the one `kolors-farm up` runs, started piece by piece under one Supervisor
(control/processes.py) that restarts whatever exits with `up`'s backoff: its own Redis
(append-only persistence, as `up` runs it), the database (SQLite, or an empty one named
by `--database-url`), render workers on the CPU serving the tiny random-weight
checkpoint (no warm-up render), the dispatcher, the webhook delivery worker and the API
under gunicorn. Nothing is simulated. A child that exits without being killed is
restarted too and counted as having exited on its own.

Load, for `--minutes`: users across tenants (12 across 4 by default), each keeping at
most two requests of their own in flight: asynchronous submissions (`POST /v2/kolors`,
then status polls) and synchronous ones (`POST /v1/kolors`, bytes or JSON), of several
sizes, steps and 1 or 2 images, some with a fixed seed (the result cache may answer
them), half of the asynchronous ones with a webhook to a receiver on loopback, some
cancelled while queued or running. Every submission carries an `Idempotency-Key`; a
submission whose answer was lost (the API died, Redis was away) is sent again with the
same key until it is answered, and a quarter of the answered ones are sent again on
purpose: each must name the same request.

Chaos, at random intervals during the load (10-30 s apart in a long run, shorter in a
short one), each kind in turn (shuffled): `kill -9` of a render worker, the dispatcher,
the API (gunicorn's master and workers) or the webhook worker, each restarted by the
supervisor under the same name; `kill -9` of Redis, restarted either empty (its
append-only file deleted: the broker and every notice forgotten, which the farm promises
to survive by publishing released jobs again) or on its append-only file.

Then it waits for every job to end, audits the books (`audit_books`, every job
terminal), checks that every webhook request got its completion delivered at least
once with a valid signature, prints a table and writes JSON (bench/results/soak.json
or `--json`). Exit status 1 when anything was lost, charged twice, abandoned or
mismatched, a webhook is missing or forged, or the audit found anything.

    .venv/bin/python bench/soak.py --minutes 60 [--database-url URL] [--json PATH] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scratch import farm_env, wait_healthy  # noqa: E402
from control.launcher import redis_argv, redis_server_binary  # noqa: E402
from control.processes import ChildSpec, Supervisor, free_port  # noqa: E402
from shared.accounts.users import create_user  # noqa: E402
from shared.db import make_engine, make_session_factory, read_only, transaction  # noqa: E402
from shared.jobs.audit import BooksAudit, audit_books  # noqa: E402
from shared.migrate import migrate_database  # noqa: E402
from shared.models import (  # noqa: E402
    TERMINAL_STATES,
    IdempotencyKey,
    Job,
    JobImage,
    LedgerEntry,
    LedgerKind,
    User,
)
from shared.redis_client import make_redis  # noqa: E402
from shared.scheduling.fleet import live_workers  # noqa: E402
from shared.storage import make_storage  # noqa: E402
from shared.webhooks.secrets import tenant_secret_by_name  # noqa: E402
from tests.webhook_receiver import Received, Receiver, running_receiver  # noqa: E402

RESULTS = REPO / "bench" / "results" / "soak.json"
WORKER_KILL: Final = "kill -9 render worker"
DISPATCHER_KILL: Final = "kill -9 dispatcher"
API_KILL: Final = "kill -9 API"
WEBHOOKS_KILL: Final = "kill -9 webhook worker"
REDIS_EMPTY: Final = "Redis restarted empty"
REDIS_KEPT: Final = "Redis kill -9, restarted on its AOF"
FAULT_KINDS: Final = (
    WORKER_KILL,
    DISPATCHER_KILL,
    API_KILL,
    WEBHOOKS_KILL,
    REDIS_EMPTY,
    REDIS_KEPT,
)
SIZES: Final = ((512, 512), (640, 512), (512, 768), (768, 768))
MAX_IN_FLIGHT_PER_USER: Final = 2
GIVE_UP_S: Final = 120.0  # a submission unanswered for this long is abandoned
# Faster recovery than the defaults, so a short soak sees every fault recovered; the
# mechanisms are the same. No warm-up render: a restarted worker serves sooner.
FARM_SETTINGS: Final = {
    "heartbeat_interval_s": "1",
    "lease_s": "15",
    "redispatch_after_s": "5",
    "sync_timeout_s": "30",
    "webhook_allow_nets": "127.0.0.0/8",
    "webhook_lease_s": "10",
    "webhook_backoff_s": "1,2,5,10,30",
    "warmup": "false",
    "device": "cpu",
}


# ---------------------------------------------------------------- the farm


class SoakFarm:
    """The farm's processes under one Supervisor that restarts whatever exits, as `up` does.

    A child that exits is started again after `up`'s backoff (1 s, doubling while it keeps
    dying within a minute of starting). Exits the chaos caused are expected; any other
    exit is counted as the child's own (`unprompted`).
    """

    def __init__(self, data_dir: Path, database_url: str, model_dir: Path, workers: int) -> None:
        self.data_dir = data_dir
        self.logs = data_dir / "logs"
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.workers = [f"cpu{index}@soak" for index in range(workers)]
        settings = dict(FARM_SETTINGS, model=str(model_dir), public_base_url=self.url)
        env = farm_env(data_dir, database_url, self.redis_url, **settings)
        env["OMP_NUM_THREADS"] = "1"  # two workers share two cores
        self.env = env
        self.supervisor = Supervisor(restart=True)
        self.specs: dict[str, ChildSpec] = {}
        self.lock = threading.Lock()  # the watcher's polls against the chaos' kills
        self.expected: Counter[str] = Counter()
        self.unprompted: Counter[str] = Counter()
        self.unprompted_log: list[dict[str, Any]] = []
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self.started = time.monotonic()

    def _spec(self, name: str, argv: list[str]) -> None:
        self.specs[name] = ChildSpec(
            name, argv, self.env, log_path=self.logs / f"{name}.log", stop_last=name == "redis"
        )

    def start(self) -> None:
        """Redis, the workers, the dispatcher, the webhook worker and the API; once ready."""
        python = sys.executable
        self._spec(
            "redis", redis_argv(redis_server_binary(), self.redis_port, self.data_dir / "redis")
        )
        for name in self.workers:
            self._spec(name, [python, "-m", "worker", "worker", "--name", name])
        self._spec("dispatcher", [python, "-m", "control", "dispatcher"])
        self._spec("webhooks", [python, "-m", "control", "webhooks", "worker"])
        self._spec("api", [python, "-m", "api", "--port", str(self.api_port), "--threads", "32"])
        self.supervisor.start(self.specs["redis"])
        _wait_redis(self.redis_url)
        for name in (*self.workers, "dispatcher", "webhooks", "api"):
            self.supervisor.start(self.specs[name])
        wait_healthy(self.url, self.logs / "api.log", timeout_s=120)
        self.wait_workers(set(self.workers), 300)
        self.started = time.monotonic()
        self._watcher = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop_watching.wait(0.5):
            with self.lock:
                exited = self.supervisor.poll()
                for child in exited:
                    name = child.spec.name
                    if self.expected[name] > 0:
                        self.expected[name] -= 1
                        continue
                    self.unprompted[name] += 1
                    at = round(time.monotonic() - self.started, 1)
                    self.unprompted_log.append(
                        {"at_s": at, "child": name, "exit_code": child.last_exit_code}
                    )
                    print(f"[{at:7.1f} s] {name} exited on its own ({child.last_exit_code})")

    def kill(self, name: str, then: Callable[[], None] | None = None) -> None:
        """`kill -9` the child's whole process group (gunicorn's workers with their master).

        `then` runs before the supervisor can notice, so before any restart.
        """
        with self.lock:
            proc = self.supervisor[name].proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                self.expected[name] += 1
            if then is not None:
                then()

    def wait_running(self, name: str, timeout_s: float = 120) -> bool:
        """Until the supervisor has started the child again."""
        return _wait(lambda: self.supervisor[name].running, timeout_s, 0.2)

    def wait_workers(self, names: set[str], timeout_s: float) -> None:
        client = make_redis(self.redis_url)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                for name in names:
                    proc = self.supervisor[name].proc
                    if proc is not None and proc.poll() is not None:
                        raise RuntimeError(f"{name} exited: {_tail(self.logs / f'{name}.log')}")
                with contextlib.suppress(redis.RedisError):
                    if names <= set(live_workers(client)):
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"workers {sorted(names)} did not start")
                time.sleep(0.5)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop watching, then stop every child, Redis last."""
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.join()
        self.supervisor.stop(grace_s=20)


def _wait_redis(url: str, timeout_s: float = 30) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


# ---------------------------------------------------------------- chaos


@dataclass
class Chaos:
    """Kills and restarts the farm's pieces at random intervals until told to stop."""

    farm: SoakFarm
    rng: random.Random
    gap_s: tuple[float, float]
    started: float
    stop: threading.Event = field(default_factory=threading.Event)
    injected: Counter[str] = field(default_factory=Counter)
    log: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                kinds = list(FAULT_KINDS)
                self.rng.shuffle(kinds)
                for kind in kinds:
                    if self.stop.wait(self.rng.uniform(*self.gap_s)):
                        return
                    self.inject(kind)
        except Exception as exc:  # the soak reports it; the farm is stopped by main
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def inject(self, kind: str) -> None:
        at = round(time.monotonic() - self.started, 1)
        name = {
            WORKER_KILL: self.rng.choice(self.farm.workers),
            DISPATCHER_KILL: "dispatcher",
            API_KILL: "api",
            WEBHOOKS_KILL: "webhooks",
        }.get(kind, "redis")

        def forget() -> None:  # Redis comes back without its append-only file
            folder = self.farm.data_dir / "redis"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()

        self.farm.kill(name, forget if kind == REDIS_EMPTY else None)
        self.injected[kind] += 1
        back = self.farm.wait_running(name)
        self.log.append({"at_s": at, "fault": kind, "child": name, "restarted": back})
        print(f"[{at:7.1f} s] {kind} ({name})", flush=True)
        if not back:
            self.errors.append(f"{name} was not started again after {kind}")


# ---------------------------------------------------------------- load


@dataclass
class Sent:
    """One logical request: what was asked, what the farm answered, how it ended."""

    key: str
    user: str
    tenant: str
    route: str  # "async" or "sync"
    body: dict[str, Any]
    submitted_at: float
    request_id: str | None = None
    webhook: bool = False
    cancel_at: float | None = None
    cancel_sent: bool = False
    ended_at: float | None = None
    status: str | None = None
    abandoned: bool = False


@dataclass
class Tally:
    """What every client did, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: list[Sent] = field(default_factory=list)
    replays: int = 0
    replay_mismatches: list[str] = field(default_factory=list)
    retries: Counter[str] = field(default_factory=Counter)  # sent again after an error, by why
    server_errors: Counter[int] = field(default_factory=Counter)
    refusals: list[str] = field(default_factory=list)  # 4xx the load never provokes
    cancels: int = 0

    def count_retry(self, why: str) -> None:
        with self.lock:
            self.retries[why] += 1


@dataclass
class Client:
    """One user's load: at most two requests in flight, submitted, polled, sometimes cancelled."""

    name: str
    tenant: str
    key: str
    url: str
    hook_url: str
    rng: random.Random
    tally: Tally
    load_until: float
    drain_until: float
    in_flight: list[Sent] = field(default_factory=list)

    def run(self) -> None:
        with httpx.Client(timeout=60, headers={"x-api-key": self.key}) as http:
            while True:
                now = time.monotonic()
                loading = now < self.load_until
                if loading and len(self.in_flight) < MAX_IN_FLIGHT_PER_USER:
                    if self.rng.random() < 0.25:
                        self.sync(http)
                    else:
                        self.submit(http)
                self.poll(http)
                if not loading and (not self.in_flight or now > self.drain_until):
                    return
                time.sleep(self.rng.uniform(0.6, 1.2))

    def params(self) -> dict[str, Any]:
        if self.rng.random() < 0.1:  # asked before, perhaps: the result cache may answer it
            return {
                "prompt": "soak: a lighthouse at dusk",
                "seed": self.rng.choice((1, 2, 3)),
                "width": 512,
                "height": 512,
                "steps": 4,
            }
        width, height = self.rng.choice(SIZES)
        return {
            "prompt": f"soak: a red fox in the snow, {self.rng.randrange(10**6)}",
            "seed": -1,
            "width": width,
            "height": height,
            "steps": self.rng.randint(2, 8),
            "number_of_images": self.rng.choice((1, 1, 2)),
        }

    def _post(
        self, http: httpx.Client, path: str, sent: Sent, headers: dict[str, str]
    ) -> httpx.Response | None:
        """Send until answered; None once it has waited GIVE_UP_S (the key is then abandoned)."""
        deadline = time.monotonic() + GIVE_UP_S
        while True:
            try:
                response = http.post(
                    f"{self.url}{path}",
                    json=sent.body,
                    headers={"Idempotency-Key": sent.key, **headers},
                )
            except httpx.TransportError:
                self.tally.count_retry("connection")
            else:
                if response.status_code in (202, 200, 504, 422):
                    return response
                if response.status_code in (409, 502, 503):
                    self.tally.count_retry(str(response.status_code))
                elif response.status_code >= 500:
                    with self.tally.lock:
                        self.tally.server_errors[response.status_code] += 1
                    self.tally.count_retry(str(response.status_code))
                else:
                    with self.tally.lock:
                        self.tally.refusals.append(
                            f"{path} {response.status_code}: {response.text[:200]}"
                        )
                    return None
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5 + self.rng.random())

    def _new(self, route: str, body: dict[str, Any]) -> Sent:
        sent = Sent(
            key=f"soak-{uuid.uuid4().hex}",
            user=self.name,
            tenant=self.tenant,
            route=route,
            body=body,
            submitted_at=time.monotonic(),
        )
        with self.tally.lock:
            self.tally.sent.append(sent)
        return sent

    def submit(self, http: httpx.Client) -> None:
        body = self.params()
        webhook = self.rng.random() < 0.5
        if webhook:
            body["webhook"] = self.hook_url
        sent = self._new("async", body)
        sent.webhook = webhook
        response = self._post(http, "/v2/kolors", sent, {})
        if response is None or response.status_code != 202:
            self._abandon(sent, response)
            return
        sent.request_id = response.json()["request_id"]
        if self.rng.random() < 0.15:
            sent.cancel_at = time.monotonic() + self.rng.uniform(0, 3)
        self.in_flight.append(sent)
        if self.rng.random() < 0.25:
            replay = self._post(http, "/v2/kolors", sent, {})
            replayed = replay.json().get("request_id") if replay is not None else None
            self._replayed(sent, replayed, replay)

    def sync(self, http: httpx.Client) -> None:
        sent = self._new("sync", self.params())
        as_json = self.rng.random() < 0.5
        headers = {"Accept": "application/json"} if as_json else {}
        response = self._post(http, "/v1/kolors", sent, headers)
        request_id = _request_id(response)
        if response is None or request_id is None or _key_reused(response):
            self._abandon(sent, response)
            return
        sent.request_id = request_id
        if response.status_code == 200:
            sent.ended_at, sent.status = time.monotonic(), "COMPLETED"
        elif response.status_code == 422:
            sent.ended_at, sent.status = time.monotonic(), "FAILED"
        else:  # 504: it goes on; follow it like an asynchronous one
            self.in_flight.append(sent)
        if self.rng.random() < 0.25:
            replay = self._post(http, "/v1/kolors", sent, headers)
            self._replayed(sent, _request_id(replay), replay)

    def _abandon(self, sent: Sent, response: httpx.Response | None) -> None:
        sent.abandoned = True
        if response is not None and _key_reused(response):
            with self.tally.lock:
                self.tally.replay_mismatches.append(f"{sent.key}: key refused as reused")

    def _replayed(self, sent: Sent, replayed: str | None, response: httpx.Response | None) -> None:
        with self.tally.lock:
            self.tally.replays += 1
            if replayed != sent.request_id:
                code = response.status_code if response is not None else "no answer"
                self.tally.replay_mismatches.append(
                    f"{sent.key}: first {sent.request_id}, replay {replayed} ({code})"
                )

    def poll(self, http: httpx.Client) -> None:
        for sent in list(self.in_flight):
            now = time.monotonic()
            if sent.cancel_at is not None and not sent.cancel_sent and now >= sent.cancel_at:
                with contextlib.suppress(httpx.TransportError):
                    cancelled = http.delete(f"{self.url}/v2/requests/{sent.request_id}")
                    if cancelled.status_code == 200:
                        sent.cancel_sent = True
                        with self.tally.lock:
                            self.tally.cancels += 1
            try:
                status = http.get(f"{self.url}/v2/requests/{sent.request_id}/status")
            except httpx.TransportError:
                continue
            if status.status_code not in (200, 422):
                continue  # the API or Redis is away: ask again next round
            state = status.json().get("status")
            if state in ("COMPLETED", "FAILED"):
                sent.ended_at = time.monotonic()
                sent.status = "CANCELLED" if status.json().get("cancelled") else state
                self.in_flight.remove(sent)


def _request_id(response: httpx.Response | None) -> str | None:
    if response is None:
        return None
    header: str | None = response.headers.get("x-request-id")
    if header:
        return header
    if "json" in response.headers.get("content-type", ""):
        found = response.json().get("request_id")
        return str(found) if found else None
    return None


def _key_reused(response: httpx.Response) -> bool:
    if response.status_code != 422 or "json" not in response.headers.get("content-type", ""):
        return False
    errors = response.json().get("errors") or []
    return any(error.get("rule") == "idempotency_key_reused" for error in errors)


# ---------------------------------------------------------------- the soak


@dataclass
class Account:
    name: str
    tenant: str
    key: str


def _make_accounts(database_url: str, users: int, tenants: int) -> list[Account]:
    engine = make_engine(database_url)
    accounts = []
    try:
        with transaction(make_session_factory(engine)) as session:
            if session.scalar(select(func.count()).select_from(User)):
                raise SystemExit("the database already has users: give the soak an empty one")
            for index in range(users):
                name, tenant = f"soak-user{index}", f"soak-team{index % tenants}"
                _, key = create_user(session, name, tenant, 10**9)  # a million credits
                accounts.append(Account(name, tenant, key))
    finally:
        engine.dispose()
    return accounts


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return round(ordered[rank], 2)


def _verify(receipt: Received, secrets: dict[str, str]) -> tuple[str | None, bool]:
    """The request id a receipt is about, and whether a tenant's secret signed it."""
    from standardwebhooks.webhooks import Webhook

    try:
        body = json.loads(receipt.body)
        headers = {name.lower(): value for name, value in receipt.headers.items()}
        stamp = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
        given = set(headers["webhook-signature"].split(" "))
        msg_id, text = headers["webhook-id"], receipt.body.decode()
    except (KeyError, ValueError):
        return None, False
    tenant = receipt.path.rsplit("/", 1)[-1]
    secret = secrets.get(tenant)
    valid = secret is not None and Webhook(secret).sign(msg_id, stamp, text) in given
    return body.get("request_id"), valid


def _wait(condition: Callable[[], bool], timeout_s: float, interval_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def run_soak(
    minutes: float,
    *,
    database_url: str | None = None,
    users: int = 12,
    tenants: int = 4,
    workers: int = 2,
    seed: int = 1,
    keep: bool = False,
) -> dict[str, Any]:
    """Run the soak; its report (what `main` prints and writes)."""
    rng = random.Random(seed)
    scratch = Path(tempfile.mkdtemp(prefix="kolors-soak-"))
    database_url = database_url or f"sqlite:///{scratch / 'farm.db'}"
    model_dir = scratch / "model"
    subprocess.run(
        [sys.executable, "-m", "worker", "tiny-model", str(model_dir)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=True,
        capture_output=True,
    )
    migrate_database(database_url)
    accounts = _make_accounts(database_url, users, tenants)
    farm = SoakFarm(scratch, database_url, model_dir, workers)
    report: dict[str, Any] = {}
    failed = True
    started = time.monotonic()
    try:
        with running_receiver() as receiver:
            farm.start()
            ready_s = time.monotonic() - started
            print(f"farm up in {ready_s:.0f} s at {farm.url}; load for {minutes:g} min", flush=True)
            report = _load_and_check(farm, receiver, accounts, rng, minutes, database_url)
            report["start_s"] = round(ready_s, 1)
        failed = bool(report["problems"])
    finally:
        farm.stop()
        report["data_dir"] = str(scratch) if (failed or keep) else None
        if not (failed or keep):
            shutil.rmtree(scratch, ignore_errors=True)
    return report


def _load_and_check(
    farm: SoakFarm,
    receiver: Receiver,
    accounts: list[Account],
    rng: random.Random,
    minutes: float,
    database_url: str,
) -> dict[str, Any]:
    load_s = minutes * 60
    begin = time.monotonic()
    drain_s = 180.0
    tally = Tally()
    clients = [
        Client(
            name=account.name,
            tenant=account.tenant,
            key=account.key,
            url=farm.url,
            hook_url=receiver.url(f"/hooks/{account.tenant}"),
            rng=random.Random(rng.random()),
            tally=tally,
            load_until=begin + load_s,
            drain_until=begin + load_s + drain_s,
        )
        for account in accounts
    ]
    top = min(30.0, load_s / (len(FAULT_KINDS) + 1))
    chaos = Chaos(farm, random.Random(rng.random()), (top / 3, top), begin)
    farm.started = begin
    threads = [threading.Thread(target=client.run, name=client.name) for client in clients]
    chaos_thread = threading.Thread(target=chaos.run, name="chaos")
    for thread in (*threads, chaos_thread):
        thread.start()
    time.sleep(load_s)
    chaos.stop.set()
    chaos_thread.join()
    print("load stopped; waiting for every request to end", flush=True)
    for thread in threads:
        thread.join()
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    terminal = [state.value for state in TERMINAL_STATES]

    def all_ended() -> bool:
        with read_only(sessions) as session:
            live = session.scalar(
                select(func.count()).select_from(Job).where(Job.state.not_in(terminal))
            )
            return not live

    drained = _wait(all_ended, drain_s)
    drained_s = time.monotonic() - begin - load_s
    with read_only(sessions) as session:
        secrets = {
            account.tenant: tenant_secret_by_name(session, account.tenant) for account in accounts
        }
    hooked = {s.request_id for s in tally.sent if s.webhook and s.request_id}

    def delivered() -> set[str]:
        with receiver.lock:
            received = list(receiver.received)
        return {
            request_id
            for receipt in received
            if (request_id := _verify(receipt, secrets)[0]) is not None
        }

    _wait(lambda: hooked <= delivered(), 90)
    try:
        with read_only(sessions) as session:
            audit = audit_books(
                session,
                make_storage(f"file://{farm.data_dir / 'results'}"),
                require_terminal=True,
            )
            report = _report(session, tally, chaos, audit, receiver, secrets, hooked)
    finally:
        engine.dispose()
    report.update(
        minutes=minutes,
        drained=drained,
        drain_s=round(drained_s, 1),
        users=len(accounts),
        tenants=len({a.tenant for a in accounts}),
        workers=len(farm.workers),
        database="SQLite" if database_url.startswith("sqlite") else "PostgreSQL",
    )
    return report


def _report(
    session: Session,
    tally: Tally,
    chaos: Chaos,
    audit: BooksAudit,
    receiver: Receiver,
    secrets: dict[str, str],
    hooked: set[str],
) -> dict[str, Any]:
    jobs = {
        row.id: row
        for row in session.execute(
            select(Job.id, Job.state, Job.images_done, Job.number_of_images, Job.user_id)
        )
    }
    keys = {
        key: job_id
        for key, job_id in session.execute(select(IdempotencyKey.key, IdempotencyKey.job_id))
    }
    entry_counts: Counter[tuple[str, str]] = Counter()
    for job_id, kind in session.execute(select(LedgerEntry.job_id, LedgerEntry.kind)):
        if job_id is not None:
            entry_counts[(job_id, kind)] += 1
    cached_jobs = set(
        session.scalars(select(JobImage.job_id).where(JobImage.cached.is_(True)).distinct())
    )
    lost: list[str] = []
    mismatched = list(tally.replay_mismatches)
    answered = [s for s in tally.sent if s.request_id is not None]
    for sent in answered:
        job = jobs.get(sent.request_id or "")
        if job is None:
            lost.append(f"{sent.request_id}: answered, not in the database")
        elif job.state not in [state.value for state in TERMINAL_STATES]:
            lost.append(f"{sent.request_id}: never ended ({job.state})")
        elif job.state == "COMPLETED" and job.images_done != job.number_of_images:
            lost.append(f"{sent.request_id}: COMPLETED with {job.images_done} images")
        if keys.get(sent.key) not in (None, sent.request_id):
            mismatched.append(f"{sent.key}: answered {sent.request_id}, names {keys[sent.key]}")
    known = {s.request_id for s in answered}
    abandoned_keys = {s.key for s in tally.sent if s.abandoned}
    abandoned_jobs = {keys[key] for key in abandoned_keys if keys.get(key)}
    charged_twice = [
        f"{job_id}: {count} holds"
        for (job_id, kind), count in entry_counts.items()
        if kind == LedgerKind.HOLD.value and count > 1
    ]
    charged_twice += [
        f"{job_id}: {count} captures for {jobs[job_id].images_done} images"
        for (job_id, kind), count in entry_counts.items()
        if kind == LedgerKind.CAPTURE.value and job_id in jobs and count > jobs[job_id].images_done
    ]
    # A job no answer named and no key claims: created behind a retry's back.
    charged_twice += [
        f"{job_id}: a job no submission was answered with"
        for job_id in sorted(set(jobs) - known - abandoned_jobs)
    ]
    with receiver.lock:
        received = list(receiver.received)
    receipts = [(receipt, *_verify(receipt, secrets)) for receipt in received]
    forged = [r.headers.get("webhook-id", "?") for r, _, valid in receipts if not valid]
    delivered = {request_id for _, request_id, valid in receipts if valid and request_id}
    missing_hooks = sorted(hooked - delivered)
    states = Counter(job.state for job in jobs.values())
    latencies = [
        s.ended_at - s.submitted_at
        for s in answered
        if s.route == "async" and s.status == "COMPLETED" and s.ended_at is not None
    ]
    problems: list[str] = []
    if lost:
        problems.append(f"{len(lost)} request(s) lost")
    if charged_twice:
        problems.append(f"{len(charged_twice)} charged twice")
    if mismatched:
        problems.append(f"{len(mismatched)} idempotent retries named another request")
    if abandoned_keys:
        problems.append(f"{len(abandoned_keys)} submission(s) unanswered for {GIVE_UP_S:g} s")
    if tally.refusals:
        problems.append(f"{len(tally.refusals)} unexpected refusal(s)")
    if not audit.clean:
        problems.append(f"the audit found {audit.total_findings} thing(s)")
    if missing_hooks:
        problems.append(f"{len(missing_hooks)} completion webhook(s) never delivered")
    if forged:
        problems.append(f"{len(forged)} webhook request(s) without a valid signature")
    if chaos.errors:
        problems.append(f"the chaos loop failed: {chaos.errors}")
    return {
        "submitted": {
            "async": sum(1 for s in answered if s.route == "async"),
            "sync": sum(1 for s in answered if s.route == "sync"),
        },
        "jobs": len(jobs),
        "completed": states["COMPLETED"],
        "failed": states["FAILED"],
        "cancelled": states["CANCELLED"],
        "from_cache": len(cached_jobs),
        "cancels_sent": tally.cancels,
        "idempotent_retries": {"sent": tally.replays, "mismatches": len(mismatched)},
        "retries_after_errors": dict(tally.retries),
        "server_errors": {str(code): n for code, n in tally.server_errors.items()},
        "faults": {kind: chaos.injected[kind] for kind in FAULT_KINDS},
        "fault_log": chaos.log,
        "exits_on_their_own": dict(chaos.farm.unprompted),
        "exits_on_their_own_log": chaos.farm.unprompted_log,
        "audit": {
            "jobs": audit.jobs,
            "users": audit.users,
            "ledger_entries": audit.ledger_entries,
            "images": audit.images,
            "objects": audit.objects,
            "findings": audit.total_findings,
            "by_rule": {str(rule): n for rule, n in audit.by_rule.items()},
            "first_findings": [
                {"rule": str(f.rule), "job_id": f.job_id, "user": f.user, "detail": f.detail}
                for f in audit.findings[:50]
            ],
        },
        "webhooks": {
            "expected": len(hooked),
            "delivered": len(hooked & delivered),
            "missing": len(missing_hooks),
            "receipts": len(receipts),
            "bad_signatures": len(forged),
        },
        "lost": lost,
        "charged_twice": charged_twice,
        "abandoned": len(abandoned_keys),
        "refusals": tally.refusals[:20],
        "async_latency_s": {
            "p50": _percentile(latencies, 0.5),
            "p95": _percentile(latencies, 0.95),
            "n": len(latencies),
        },
        "problems": problems,
    }


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _commit() -> str | None:
    """The checkout's commit, where it is a git checkout."""
    found = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return (found.stdout.strip() or None) if found.returncode == 0 else None


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Soak", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    submitted = report["submitted"]
    latency = report["async_latency_s"]
    rows = [
        ("minutes of load", f"{report['minutes']:g}"),
        ("database", report["database"]),
        ("users / tenants / render workers", f"{report['users']} / {report['tenants']} / "
         f"{report['workers']}"),
        ("submitted (async / sync)", f"{submitted['async']} / {submitted['sync']}"),
        ("completed", str(report["completed"])),
        ("failed", str(report["failed"])),
        ("cancelled (cancels sent)", f"{report['cancelled']} ({report['cancels_sent']})"),
        ("answered from the cache", str(report["from_cache"])),
        ("idempotent retries (mismatches)",
         f"{report['idempotent_retries']['sent']} ({report['idempotent_retries']['mismatches']})"),
        ("sent again after an error",
         ", ".join(f"{why} {n}" for why, n in sorted(report["retries_after_errors"].items()))
         or "0"),
        *((f"fault: {kind}", str(n)) for kind, n in report["faults"].items()),
        ("exited on their own (restarted)",
         ", ".join(f"{name} {n}" for name, n in sorted(report["exits_on_their_own"].items()))
         or "none"),
        ("audit: jobs / entries / images / objects",
         f"{report['audit']['jobs']} / {report['audit']['ledger_entries']} / "
         f"{report['audit']['images']} / {report['audit']['objects']}"),
        ("audit findings", str(report["audit"]["findings"])),
        ("webhooks delivered / expected (bad signatures)",
         f"{report['webhooks']['delivered']} / {report['webhooks']['expected']} "
         f"({report['webhooks']['bad_signatures']})"),
        ("lost", str(len(report["lost"]))),
        ("charged twice", str(len(report["charged_twice"]))),
        ("abandoned submissions", str(report["abandoned"])),
        ("async latency p50 / p95 (s)", f"{latency['p50']} / {latency['p95']}"),
        ("drained in (s)", str(report["drain_s"])),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    if report["problems"]:
        console.print("[bold red]problems:[/] " + "; ".join(report["problems"]))
    else:
        console.print("nothing lost, nothing charged twice, the audit found nothing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of load")
    parser.add_argument("--database-url", default=None, help="an empty database (default SQLite)")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="render workers (CPU)")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and its logs")
    args = parser.parse_args()
    report = run_soak(
        args.minutes,
        database_url=args.database_url,
        users=args.users,
        tenants=args.tenants,
        workers=args.workers,
        seed=args.seed,
        keep=args.keep,
    )
    report["machine"] = machine()
    report["command"] = "bench/soak.py " + " ".join(sys.argv[1:])
    report["commit"] = _commit()
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    if report.get("data_dir"):
        print(f"logs: {report['data_dir']}/logs")
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
