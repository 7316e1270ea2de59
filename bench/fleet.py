"""Control-plane throughput: 1 to 64 simulated workers against one dispatcher and PostgreSQL.

SIMULATED WORKERS. Each simulated worker runs the farm's real worker code
(`worker.render.start_render_job`: claim with a lease, the lease keeper, step
progress, the post-processing thread that encodes, stores, records and settles,
the end announcement and the dispatcher wake-up) and takes its messages from the
real Redis broker queue the dispatcher publishes to, with the pipeline call
replaced by a sleep of `--device-s` seconds that returns a small fixed image. A
real worker process imports torch and diffusers (about 470 MB each), so the
simulated workers are threads, up to 16 per process, each with its own worker
context and broker consumer; they heartbeat like workers, so the dispatcher
sizes its releases to them.

The queue is filled beforehand (bulk inserts of what `submit_job` writes: the
job, its hold in the ledger, its place in its user's line) with jobs of 40 users
in 20 tenants. For each fleet size it measures, over a fixed window:

- jobs/s settled, against the ideal `workers / device_s`, and the efficiency;
- dispatch latency: how long a worker's device waits between the end of one
  render and the start of the next (fetching a message, claiming the job; the
  dispatcher's release when the broker ran dry), p50 and p95;
- the knee: the first fleet size whose throughput falls more than 5% below
  linear (each worker as fast as in the smallest fleet), where the control plane
  (dispatcher, database, broker, this machine's cores), not the workers, becomes
  the limit;
- the control plane's cost per settled job by process kind, from each process's own
  CPU times (/proc/PID/stat: utime + stime of every thread, plus cutime + cstime, the
  children it reaped), sampled at the start and end of the window: the dispatcher, the
  simulated workers' processes (all of it is control code: the simulated render is a
  sleep and costs no CPU; what remains of it is copying a 64x64 image), PostgreSQL
  (the backends connected to this bench's database, listed in pg_stat_activity; also
  the whole server: the postmaster's tree, with other databases' work on a shared host
  and the background writers), Redis (the redis-server process) and the API (gunicorn
  master and workers; idle during the window, since the queue is filled beforehand);
  with the PostgreSQL transactions (pg_stat_database) and Redis commands (INFO
  commandstats) per job.

Before the fleet sizes, `--submits` jobs are submitted through the API (POST
/v2/kolors, 4 clients) and the same CPU times give the cost of a submission.

Statements: in this process, on a scratch database of its own, `--statement-jobs`
jobs of `--statement-images` images each go through the real transitions, counting
SQL statements (`before_cursor_execute`), transactions (commit and rollback events),
pool checkouts (each a pre-ping round trip) and Redis commands per phase: submit (the
API's POST /v2/kolors through Flask's test client, key lookup included), release (the
dispatcher's release pass, `Dispatcher._release`, for 8 heartbeating workers), claim,
each image but the last, and the last image with the job's end (one transaction).

    .venv/bin/python bench/fleet.py [--sizes 1,2,4,8,16,32,64] [--device-s 0.2]
        [--seconds 15] [--submits 300] [--statement-jobs 200] [--statement-images 2]
        [--statements-only] [--out bench/results/fleet.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.queue_depth import tenant_rows  # noqa: E402
from bench.scratch import bench_user, farm_env, scratch_farm, scratch_redis  # noqa: E402
from control.processes import ChildSpec, Supervisor  # noqa: E402
from shared.jobs.params import KolorsParams  # noqa: E402
from shared.migrate import migrate_database  # noqa: E402
from shared.models import Job, LedgerEntry, Tenant, TenantQueue, User, UserQueue  # noqa: E402
from shared.redis_client import make_redis  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "KOLORS_FARM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
THREADS_PER_PROCESS = 16
PARAMS = KolorsParams(prompt="a fox", width=512, height=512, steps=4, output_format="png")
PRICE = 40  # millicredits: 512x512 at 4 steps
T0 = datetime(2026, 11, 1, tzinfo=UTC)
SUBMIT_BODY = {"prompt": "a fox", "width": 512, "height": 512, "steps": 4, "output_format": "png"}
KINDS = ("api", "dispatcher", "workers", "postgresql", "redis")
console = Console(width=180)


# ---------------------------------------------------------------- the simulated worker


class SimulatedRenderer:
    """Stands in for KolorsRenderer: sleeps `device_s` per pipeline call, returns small images."""

    def __init__(self, device_s: float) -> None:
        from PIL import Image

        self.device_s = device_s
        self.device = "sim"
        self.model_id = "simulated"
        self.warm = True
        # Simulated pixels are never a cache hit: no fingerprint, so no cache keys.
        self.render_fingerprint: str | None = None
        self._image = Image.new("RGB", (64, 64), (200, 80, 40))
        # When the worker last finished a render and went back for a message, and the
        # waits from then to the next render's start (the control plane's share).
        self.free_since: float | None = None
        self.gaps: list[float] = []

    def images_per_call(self, params: Any, max_batch: int, model: Any) -> int:
        return max_batch

    def render(self, params: Any, seeds: list[int], on_step: Any, should_stop: Any) -> Any:
        if self.free_since is not None:
            self.gaps.append(time.monotonic() - self.free_since)
            self.free_since = None
        per_step = self.device_s / params.steps
        for step in range(1, params.steps + 1):
            time.sleep(per_step)
            on_step(step, params.steps)
            if should_stop():
                return None
        return [self._image.copy() for _ in seeds]

    def generation_record(self, params: Any, seed: int) -> dict[str, Any]:
        return {"parameters": {"seed": seed}, "model": "simulated"}

    def device_status(self) -> dict[str, Any]:
        return {"device_name": "simulated"}


def sim_process(names: list[str], device_s: float, gaps_file: Path) -> None:
    """Run simulated workers (threads) until SIGTERM: each consumes the render queue."""
    from kombu.connection import Connection

    from shared.celery_app import RENDER_QUEUE
    from shared.resources import open_resources
    from shared.scheduling.fleet import forget_worker, record_heartbeat
    from shared.settings import Settings
    from worker.context import WorkerContext
    from worker.render import start_render_job

    settings = Settings()
    resources = open_resources(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    renderers: list[SimulatedRenderer] = []

    def serve(name: str) -> None:
        renderer = SimulatedRenderer(device_s)
        renderers.append(renderer)
        context = WorkerContext(
            name=name,
            settings=settings,
            sessions=resources.sessions,
            redis=resources.redis,
            storage=resources.storage,
            renderer=renderer,  # type: ignore[arg-type]
        )

        def beat() -> None:
            while not stop.is_set():
                record_heartbeat(context.redis, name, {"device": "sim"}, ttl_s=3.0)
                stop.wait(1.0)

        threading.Thread(target=beat, daemon=True).start()
        with Connection(settings.require_redis_url()) as connection:  # type: ignore[no-untyped-call]
            queue = connection.SimpleQueue(RENDER_QUEUE)
            renderer.free_since = time.monotonic()
            while not stop.is_set():
                try:
                    message = queue.get(block=True, timeout=0.5)
                except queue.Empty:
                    continue
                args = message.payload[0]  # Celery protocol 2: [args, kwargs, embed]
                start_render_job(context, args[0])
                renderer.free_since = time.monotonic()
                message.ack()
            queue.close()
        context.close()
        forget_worker(context.redis, name)

    threads = [threading.Thread(target=serve, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    resources.close()
    gaps_file.write_text(json.dumps([gap for r in renderers for gap in r.gaps]))


# ---------------------------------------------------------------- the queue


def fill_queue(url: str, jobs: int) -> None:
    """Bulk-write `jobs` waiting jobs of 40 users in 20 tenants, with their holds and lines."""
    engine = sa.create_engine(url)
    params = PARAMS.render_fields()
    work = PARAMS.width * PARAMS.height * PARAMS.steps
    users = 40
    per_user = [jobs // users + (u < jobs % users) for u in range(users)]
    with engine.begin() as connection:
        connection.execute(
            sa.insert(Tenant),
            [{"id": t + 1, "name": f"t{t}", "weight": 1, "created_at": T0} for t in range(20)],
        )
        connection.execute(
            sa.insert(User),
            [
                {
                    "id": u + 1,
                    "tenant_id": u // 2 + 1,
                    "name": f"u{u}",
                    "weight": 1,
                    "balance": 10**12,
                    "created_at": T0,
                }
                for u in range(users)
            ],
        )
        rows: list[dict[str, Any]] = []
        holds: list[dict[str, Any]] = []
        lines: list[dict[str, Any]] = []
        clock = 0
        for u, count in enumerate(per_user):
            ids = []
            for seq in range(count):
                clock += 1
                job_id = uuid.uuid4().hex
                created = T0 + timedelta(microseconds=clock * 10)
                ids.append((job_id, created))
                rows.append(
                    {
                        "id": job_id,
                        "tenant_id": u // 2 + 1,
                        "user_id": u + 1,
                        "state": "QUEUED",
                        "params": params,
                        "seed": clock,
                        "number_of_images": 1,
                        "images_done": 0,
                        "price_per_image": PRICE,
                        "attempt": 0,
                        "cancel_requested": False,
                        "created_at": created,
                        "expires_at": created + timedelta(days=30),
                        "queue_seq": seq,
                        "work": work,
                    }
                )
                holds.append(
                    {
                        "user_id": u + 1,
                        "job_id": job_id,
                        "kind": "hold",
                        "available_delta": -PRICE,
                        "held_delta": PRICE,
                        "created_at": created,
                    }
                )
            lines.append(
                {
                    "user_id": u + 1,
                    "tenant_id": u // 2 + 1,
                    "waiting": count,
                    "in_flight": 0,
                    "waiting_work": count * work,
                    "head_seq": 0,
                    "head_job_id": ids[0][0],
                    "head_created_at": ids[0][1],
                    "tail_job_id": ids[-1][0],
                    "tail_created_at": ids[-1][1],
                    "last_created_at": ids[-1][1],
                }
            )
        for start in range(0, len(rows), 5000):
            connection.execute(sa.insert(Job), rows[start : start + 5000])
            connection.execute(sa.insert(LedgerEntry), holds[start : start + 5000])
        connection.execute(sa.insert(UserQueue), lines)
        connection.execute(
            sa.insert(TenantQueue),
            tenant_rows(lines, {u + 1: 1 for u in range(users)}, {t + 1: 1 for t in range(20)}),
        )
    engine.dispose()


# ---------------------------------------------------------------- CPU by process kind

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """One process's CPU ticks from /proc/PID/stat."""

    ppid: int
    own: int  # utime + stime, over all its threads (those that ended included)
    reaped: int  # cutime + cstime: the children it waited for, and theirs


def proc_table() -> dict[int, ProcStat]:
    """Every process on this host that can be read, by pid."""
    table: dict[int, ProcStat] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone since the listing
        # After the command name (in parentheses, which may hold anything): field 3 on.
        fields = text[text.rindex(")") + 2 :].split()
        table[int(entry.name)] = ProcStat(
            ppid=int(fields[1]),
            own=int(fields[11]) + int(fields[12]),
            reaped=int(fields[13]) + int(fields[14]),
        )
    return table


def tree_ticks(table: dict[int, ProcStat], roots: list[int]) -> int:
    """CPU ticks of `roots` and their descendants: the live ones, and those reaped."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, stat in table.items():
        children[stat.ppid].append(pid)
    total = 0
    stack = [pid for pid in roots if pid in table]
    while stack:
        pid = stack.pop()
        total += table[pid].own + table[pid].reaped
        stack += children.get(pid, [])
    return total


def host_busy_ticks() -> tuple[int, int]:
    """This host's CPU ticks (all cores, every process): busy, and busy plus idle."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


@dataclass(frozen=True)
class Sample:
    at: float
    table: dict[int, ProcStat]
    backends: set[int]  # the PostgreSQL backends connected to this bench's database
    transactions: int  # its committed and rolled-back transactions (pg_stat_database)
    redis_calls: Counter[str]  # Redis commands by name (INFO commandstats)
    host: tuple[int, int]


class CostProbe:
    """Samples the CPU times of the farm's processes, PostgreSQL's and Redis's counters."""

    def __init__(self, url: str, redis_url: str, pids: dict[str, list[int]]) -> None:
        self.engine = sa.create_engine(url, pool_size=1)
        self.redis = make_redis(redis_url)
        self.pids = pids  # process kind: the roots of its trees (not postgresql)
        with self.engine.connect() as connection:
            backend = connection.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        stat = proc_table().get(int(backend))
        # None when PostgreSQL runs where this host's /proc does not show it.
        self.postmaster = stat.ppid if stat is not None else None

    def sample(self) -> Sample:
        with self.engine.connect() as connection:
            backends = set(
                connection.execute(
                    sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
                ).scalars()
            )
            transactions = connection.execute(
                sa.text(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database"
                    " WHERE datname = current_database()"
                )
            ).scalar_one()
            connection.commit()
        stats = self.redis.info("commandstats")
        calls = Counter(
            {
                name.removeprefix("cmdstat_"): int(value["calls"])
                for name, value in stats.items()
                if name != "cmdstat_info"
            }
        )
        return Sample(
            time.monotonic(), proc_table(), backends, int(transactions), calls, host_busy_ticks()
        )

    def close(self) -> None:
        self.engine.dispose()
        self.redis.close()


def costs(probe: CostProbe, start: Sample, end: Sample, jobs: int) -> dict[str, Any]:
    """CPU ms per job by process kind between two samples, and the counters per job."""
    per_job = 1000 / CLOCK_TICKS / max(jobs, 1)
    cpu: dict[str, float | None] = {}
    for kind in KINDS:
        if kind == "postgresql":
            continue
        roots = probe.pids.get(kind, [])
        cpu[kind] = (tree_ticks(end.table, roots) - tree_ticks(start.table, roots)) * per_job
    # A backend present at the end counts from the start (or from its birth, if it
    # connected later); one that disconnected within the window is not counted.
    backend_ticks = 0
    for pid in end.backends:
        if pid in end.table:
            before = start.table[pid].own if pid in start.backends and pid in start.table else 0
            backend_ticks += end.table[pid].own - before
    lost = len(start.backends - end.backends)
    server: float | None = None
    if probe.postmaster is not None:
        cpu["postgresql"] = backend_ticks * per_job
        server = (
            tree_ticks(end.table, [probe.postmaster]) - tree_ticks(start.table, [probe.postmaster])
        ) * per_job
    else:
        cpu["postgresql"] = None
    known = [value for value in cpu.values() if value is not None]
    window_s = end.at - start.at
    redis_calls = end.redis_calls - start.redis_calls
    busy = end.host[0] - start.host[0]
    return {
        "cpu_ms_per_job": {kind: _round(cpu[kind]) for kind in KINDS}
        | {"total": _round(sum(known))},
        "postgresql_server_cpu_ms_per_job": _round(server),
        "postgresql_backends_lost": lost,
        "farm_cores_busy": round(sum(known) * max(jobs, 1) / 1000 / window_s, 2),
        "host_cores_busy": round(
            busy / max(end.host[1] - start.host[1], 1) * (os.cpu_count() or 1), 2
        ),
        "postgresql_transactions_per_job": round(
            (end.transactions - start.transactions) / max(jobs, 1), 2
        ),
        "redis_commands_per_job": round(sum(redis_calls.values()) / max(jobs, 1), 2),
        "redis_commands_per_job_by_name": {
            name: round(count / max(jobs, 1), 2) for name, count in redis_calls.most_common(12)
        },
    }


def _round(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


# ---------------------------------------------------------------- measuring


def settled_between(url: str, start: datetime, end: datetime) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        count = connection.execute(
            sa.select(sa.func.count())
            .select_from(Job)
            .where(Job.finished_at >= start, Job.finished_at < end)
        ).scalar_one()
    engine.dispose()
    return int(count)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


def measure(
    env: dict[str, str],
    url: str,
    workers: int,
    device_s: float,
    seconds: float,
    logs: Path,
    probe: CostProbe,
) -> dict[str, Any]:
    supervisor = Supervisor(restart=False)
    sim_pids: list[int] = []
    names = [f"sim{workers}-{i}" for i in range(workers)]
    groups = [names[i : i + THREADS_PER_PROCESS] for i in range(0, workers, THREADS_PER_PROCESS)]
    for index, group in enumerate(groups):
        child = supervisor.start(
            ChildSpec(
                f"sim{workers}-{index}",
                [
                    sys.executable,
                    __file__,
                    "--sim",
                    ",".join(group),
                    "--device-s",
                    str(device_s),
                    "--gaps",
                    str(logs / f"gaps{workers}-{index}.json"),
                ],
                env,
                log_path=logs / f"sim{workers}-{index}.log",
            )
        )
        assert child.proc is not None
        sim_pids.append(child.proc.pid)
    probe.pids["workers"] = sim_pids
    try:
        # Until every simulated worker sends heartbeats (a process imports torch first).
        from shared.scheduling.fleet import live_workers

        client = make_redis(env["KOLORS_FARM_REDIS_URL"])
        deadline = time.monotonic() + 180
        while not set(names) <= set(live_workers(client)):
            if time.monotonic() > deadline:
                raise RuntimeError("the simulated workers did not start; see " + str(logs))
            time.sleep(0.2)
        time.sleep(max(2.0, 5 * device_s))  # the first releases and claims
        first = probe.sample()
        start = datetime.now(UTC)
        time.sleep(seconds)
        end = datetime.now(UTC)
        last = probe.sample()
    finally:
        # Past the knee each worker drains a backlog of images to record on shutdown.
        supervisor.stop(grace_s=180)
    done = settled_between(url, start, end)
    # The first wait of each worker includes its start; the rest are the control plane's.
    gaps: list[float] = []
    for index in range(len(groups)):
        gaps_file = logs / f"gaps{workers}-{index}.json"
        if not gaps_file.is_file():
            log_tail = (logs / f"sim{workers}-{index}.log").read_text()[-4000:]
            raise RuntimeError(f"sim{workers}-{index} wrote no gaps; its log ends:\n{log_tail}")
        gaps += [gap * 1000 for gap in json.loads(gaps_file.read_text())[1:]]
    rate = done / (end - start).total_seconds()
    ideal = workers / device_s
    return {
        "workers": workers,
        "jobs_per_s": round(rate, 1),
        "ideal_jobs_per_s": round(ideal, 1),
        "efficiency": round(rate / ideal, 3),
        "dispatch_p50_ms": round(percentile(gaps, 0.5), 1),
        "dispatch_p95_ms": round(percentile(gaps, 0.95), 1),
        "settled": done,
        **costs(probe, first, last, done),
    }


# ---------------------------------------------------------------- submissions through the API


def advance_sequences(url: str) -> None:
    """Move the id sequences past the ids `fill_queue` wrote, so that new rows can follow."""
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        for table in ("tenants", "users"):
            connection.execute(
                sa.text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" (SELECT max(id) FROM {table}))"
                )
            )
    engine.dispose()


def measure_submits(api_url: str, key: str, submits: int, probe: CostProbe) -> dict[str, Any]:
    """Submit `submits` jobs through the API with 4 clients: the cost of a submission."""
    with httpx.Client(base_url=api_url, headers={"x-api-key": key}, timeout=60) as client:

        def submit(_: int) -> int:
            return client.post("/v2/kolors", json=SUBMIT_BODY).status_code

        submit(0)  # the first request of each gunicorn thread is not the steady cost
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(submit, range(8)))
            first = probe.sample()
            codes = list(pool.map(submit, range(submits)))
            last = probe.sample()
    accepted = sum(code == 202 for code in codes)
    if accepted != submits:
        raise RuntimeError(f"submissions answered {Counter(codes)}")
    return {
        "submitted": accepted,
        "submits_per_s": round(accepted / (last.at - first.at), 1),
        **costs(probe, first, last, accepted),
    }


# ---------------------------------------------------------------- statements per job


class StatementCounter:
    """SQL statements, transactions and pool checkouts of every engine, by phase."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.texts: dict[str, Counter[str]] = defaultdict(Counter)

    def _count(self, what: str) -> None:
        if self.phase is not None:
            self.counts[self.phase][what] += 1

    def on_statement(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self._count("statements")
        if self.phase is not None:
            self.texts[self.phase][" ".join(statement.split())[:160]] += 1

    def on_commit(self, *_: Any) -> None:
        self._count("commits")

    def on_rollback(self, *_: Any) -> None:
        self._count("rollbacks")

    def on_checkout(self, *_: Any) -> None:
        self._count("checkouts")

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        hooks = [
            (sa.engine.Engine, "before_cursor_execute", self.on_statement),
            (sa.engine.Engine, "commit", self.on_commit),
            (sa.engine.Engine, "rollback", self.on_rollback),
            (sa.pool.Pool, "checkout", self.on_checkout),
        ]
        for target, name, hook in hooks:
            sa.event.listen(target, name, hook)
        try:
            yield
        finally:
            for target, name, hook in hooks:
                sa.event.remove(target, name, hook)


def count_statements(jobs: int, images: int, batch: int = 8) -> dict[str, Any]:
    """Run `jobs` jobs through submit, release, claim, images and end; counts per phase."""
    from shared.accounts.users import create_user
    from shared.celery_app import make_celery
    from shared.db import make_engine, make_session_factory, transaction
    from shared.jobs.transitions import claim_job, record_image
    from shared.resources import open_resources
    from shared.scheduling.fleet import record_heartbeat
    from shared.settings import Settings

    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    database = f"kf_fleet_sql_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
    url = sa.make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(False)
    counter = StatementCounter()
    redis_calls: dict[str, Counter[str]] = defaultdict(Counter)
    occurrences: Counter[str] = Counter()
    saved_env = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory(prefix="kf-fleet-sql-") as tmp:
            workdir = Path(tmp)
            with scratch_redis(workdir / "redis") as server:
                os.environ.update(farm_env(workdir, url, server.url))
                migrate_database(url)
                engine = make_engine(url)
                sessions = make_session_factory(engine)
                keys = []
                with transaction(sessions) as session:
                    for u in range(40):  # 40 users in 20 tenants, as the fleet's queue
                        _, key = create_user(session, f"u{u}", f"t{u // 2}", 10**12)
                        keys.append(key)
                engine.dispose()
                from api.app import create_app
                from control.dispatcher import Dispatcher, PassReport

                app = create_app()
                client = app.test_client()
                settings = Settings()
                resources = open_resources(settings)
                dispatcher = Dispatcher(resources, make_celery(settings))
                workers = [f"sql-{i}" for i in range(batch)]
                for name in workers:
                    record_heartbeat(resources.redis, name, {"device": "sim"}, ttl_s=3600)
                stats = make_redis(server.url)

                @contextlib.contextmanager
                def phase(name: str) -> Iterator[None]:
                    before = Counter(
                        {k: int(v["calls"]) for k, v in stats.info("commandstats").items()}
                    )
                    counter.phase = name
                    try:
                        yield
                    finally:
                        counter.phase = None
                        after = Counter(
                            {k: int(v["calls"]) for k, v in stats.info("commandstats").items()}
                        )
                        after["cmdstat_info"] -= 1  # the sample itself
                        redis_calls[name] += after - before

                body = SUBMIT_BODY | {"number_of_images": images}
                with counter.listening():
                    for i in range(jobs):
                        with phase("submit"):
                            response = client.post(
                                "/v2/kolors", json=body, headers={"x-api-key": keys[i % 40]}
                            )
                        assert response.status_code == 202, response.get_json()
                        occurrences["submit"] += 1
                    lease = timedelta(seconds=60)
                    done = 0
                    while done < jobs:
                        report = PassReport()
                        with phase("release"):
                            dispatcher._release(report)
                        occurrences["release pass"] += 1
                        occurrences["release"] += len(report.released)
                        if not report.released:
                            raise RuntimeError("a release pass released nothing")
                        for job_id, worker in zip(report.released, workers * batch, strict=False):
                            with phase("claim"), transaction(resources.sessions) as session:
                                spec = claim_job(session, job_id, worker, lease)
                            assert spec is not None
                            occurrences["claim"] += 1
                            for index in range(images):
                                last = index == images - 1
                                name = "last image + end" if last else "image"
                                with phase(name), transaction(resources.sessions) as session:
                                    record_image(
                                        session,
                                        job_id,
                                        spec.attempt,
                                        index,
                                        seed=spec.image_seed(index),
                                        storage_key=f"sim/{job_id}/{index}.png",
                                        content_type="image/png",
                                        size_bytes=1000,
                                        generation={"model": "simulated"},
                                        finish=last,
                                        user_id=spec.user_id,
                                    )
                                occurrences[name] += 1
                            done += 1
                resources.close()
                stats.close()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        with contextlib.suppress(Exception), admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.dispose()
    kinds: dict[str, dict[str, float]] = {}
    for name in ("submit", "release", "claim", "image", "last image + end"):
        count = max(occurrences[name], 1)
        seen = counter.counts[name]
        kinds[name] = {
            "statements": round(seen["statements"] / count, 2),
            "transactions": round((seen["commits"] + seen["rollbacks"]) / count, 2),
            "rollbacks": round(seen["rollbacks"] / count, 2),
            "checkouts": round(seen["checkouts"] / count, 2),
            "redis_commands": round(sum(redis_calls[name].values()) / count, 2),
        }
    passes = max(occurrences["release pass"], 1)
    per_pass = {
        "jobs": round(occurrences["release"] / passes, 2),
        "statements": round(counter.counts["release"]["statements"] / passes, 2),
        "transactions": round(
            (counter.counts["release"]["commits"] + counter.counts["release"]["rollbacks"])
            / passes,
            2,
        ),
    }

    def total(per_job_images: int) -> dict[str, float]:
        parts = [kinds["submit"], kinds["release"], kinds["claim"], kinds["last image + end"]]
        parts += [kinds["image"]] * (per_job_images - 1)
        return {
            key: round(sum(part[key] for part in parts), 2)
            for key in ("statements", "transactions", "checkouts", "redis_commands")
        }

    return {
        "jobs": jobs,
        "images_per_job": images,
        "release_batch": batch,
        "per_kind": kinds,
        "release_per_pass": per_pass,
        "per_job_1_image": total(1),
        f"per_job_{images}_images": total(images),
        "statements_by_kind": {
            name: {
                text: round(n / max(occurrences[name], 1), 2)
                for text, n in counter.texts[name].most_common(12)
            }
            for name in kinds
        },
        "redis_commands_by_kind": {
            name: {
                cmd.removeprefix("cmdstat_"): round(n / max(occurrences[name], 1), 2)
                for cmd, n in redis_calls[name].most_common(8)
            }
            for name in kinds
        },
    }


# ---------------------------------------------------------------- tables


def statements_table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"SQL per job by kind (PostgreSQL, {result['jobs']} jobs of "
        f"{result['images_per_job']} images, releases in passes for "
        f"{result['release_batch']} workers)"
    )
    for column in ("kind", "statements", "transactions", "pool checkouts", "Redis commands"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    rows = [(name, values) for name, values in result["per_kind"].items()]
    rows += [("per job, 1 image", result["per_job_1_image"])]
    images = result["images_per_job"]
    rows += [(f"per job, {images} images", result[f"per_job_{images}_images"])]
    for name, values in rows:
        table.add_row(
            name,
            f"{values['statements']:.2f}",
            f"{values['transactions']:.2f}",
            f"{values['checkouts']:.2f}",
            f"{values['redis_commands']:.2f}",
        )
    return table


def cost_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title=title)
    table.add_column("", justify="right")
    for column in (
        *KINDS,
        "total",
        "PG server",
        "farm cores",
        "host cores",
        "PG xact/job",
        "Redis cmd/job",
    ):
        table.add_column(column, justify="right")

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    for label, row in rows:
        cpu = row["cpu_ms_per_job"]
        table.add_row(
            label,
            *(ms(cpu[kind]) for kind in (*KINDS, "total")),
            ms(row["postgresql_server_cpu_ms_per_job"]),
            f"{row['farm_cores_busy']:.2f}",
            f"{row['host_cores_busy']:.2f}",
            f"{row['postgresql_transactions_per_job']:.2f}",
            f"{row['redis_commands_per_job']:.2f}",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--device-s", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--submits", type=int, default=300, help="jobs submitted through the API")
    parser.add_argument("--statement-jobs", type=int, default=200)
    parser.add_argument("--statement-images", type=int, default=2)
    parser.add_argument(
        "--statements-only", action="store_true", help="count SQL per job, run no fleet"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fleet.json"))
    parser.add_argument("--sim", help=argparse.SUPPRESS)  # internal: run simulated workers
    parser.add_argument("--gaps", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sim:
        sim_process(args.sim.split(","), args.device_s, Path(args.gaps))
        return
    statements = count_statements(args.statement_jobs, args.statement_images)
    console.print(statements_table(statements))
    if args.statements_only:
        out = Path(args.out)
        previous = json.loads(out.read_text()) if out.is_file() else {}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(previous | {"statements": statements}, indent=2) + "\n")
        print(f"wrote the statements into {out}")
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    database = f"kf_fleet_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
    url = sa.make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(False)
    rows: list[dict[str, Any]] = []

    def drop_database() -> None:
        with contextlib.suppress(Exception), admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    with tempfile.TemporaryDirectory(prefix="kf-fleet-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        stack.callback(drop_database)  # last, once the dispatcher and Redis have stopped
        scratch = stack.enter_context(scratch_redis(workdir / "redis"))
        env = farm_env(workdir, url, scratch.url, lease_s="60", progress_interval_s="0.5")
        migrate_database(url)
        capacity = sum(int(s / args.device_s * (args.seconds + 20)) for s in sizes)
        fill_queue(url, capacity + 1000)
        advance_sequences(url)
        key = bench_user(url, 10**12)
        farm = stack.enter_context(scratch_farm(env, workdir))
        dispatcher = farm.start("dispatcher", "-m", "control", "dispatcher")
        api_url, api_pid = farm.start_api()
        assert dispatcher.proc is not None
        pids = {
            "api": [api_pid],
            "dispatcher": [dispatcher.proc.pid],
            "redis": [scratch.process.pid],
        }
        probe = CostProbe(url, scratch.url, pids)
        stack.callback(probe.close)
        if probe.postmaster is None:
            print("PostgreSQL's processes are not visible in this host's /proc: no CPU for it")
        submits = measure_submits(api_url, key, args.submits, probe) if args.submits else None
        if submits is not None:
            console.print(
                cost_table(
                    f"Submission through the API (POST /v2/kolors, 4 clients, "
                    f"{submits['submits_per_s']} submits/s): CPU ms per submitted job",
                    [("submit", submits)],
                )
            )
        print(f"simulated workers, device time {args.device_s} s per job (a sleep)")
        print(f"{'workers':>7} {'jobs/s':>8} {'ideal':>8} {'eff':>6} {'disp p50':>8} {'p95':>8}")
        for size in sizes:
            row = measure(env, url, size, args.device_s, args.seconds, workdir, probe)
            # Linear scaling: each worker as fast as the smallest fleet's workers.
            per_worker = rows[0]["jobs_per_s"] / rows[0]["workers"] if rows else 0
            row["linearity"] = round(
                row["jobs_per_s"] / (size * per_worker) if per_worker else 1.0, 3
            )
            rows.append(row)
            print(
                f"{row['workers']:>7} {row['jobs_per_s']:>8.1f} {row['ideal_jobs_per_s']:>8.1f}"
                f" {row['efficiency']:>6.2f} {row['linearity']:>6.2f}"
                f" {row['dispatch_p50_ms']:>8.1f} {row['dispatch_p95_ms']:>8.1f}",
                flush=True,
            )
    console.print(
        cost_table(
            "Control-plane CPU ms per settled job by process kind (simulated renderer: "
            "the workers' CPU is all control code)",
            [(str(row["workers"]), row) for row in rows],
        )
    )
    knee = next((row["workers"] for row in rows if row["linearity"] < 0.95), None)
    result = {
        "simulated": "workers are threads running the real worker code with a sleep for the "
        "pipeline call and a 64x64 image",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "database": "postgresql",
        "device_s": args.device_s,
        "seconds": args.seconds,
        "rows": rows,
        "knee_workers": knee,
        "best_jobs_per_s": max((row["jobs_per_s"] for row in rows), default=None),
        "cost_notes": "cpu_ms_per_job: each process kind's own CPU times (/proc/PID/stat, "
        "threads and reaped children included) over the window, per job settled in it; "
        "workers: the simulated workers' processes (the render is a sleep: all control code); "
        "postgresql: the backends connected to this database (postgresql_server_cpu_ms_per_job: "
        "the whole server, other databases' work on the host included); api: idle in the "
        "window (the queue is filled beforehand), see submit for a submission's cost",
        "submit": submits,
        "statements": statements,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"knee: {knee} workers; best {result['best_jobs_per_s']} jobs/s; wrote {args.out}")


if __name__ == "__main__":
    main()
