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
  the limit.

    .venv/bin/python bench/fleet.py [--sizes 1,2,4,8,16,32,64] [--device-s 0.2]
        [--seconds 15] [--out bench/results/fleet.json]
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.queue_depth import tenant_rows  # noqa: E402
from bench.scratch import farm_env, scratch_farm, scratch_redis  # noqa: E402
from control.processes import ChildSpec, Supervisor  # noqa: E402
from shared.jobs.params import KolorsParams  # noqa: E402
from shared.migrate import migrate_database  # noqa: E402
from shared.models import Job, LedgerEntry, Tenant, TenantQueue, User, UserQueue  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "KOLORS_FARM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
THREADS_PER_PROCESS = 16
PARAMS = KolorsParams(prompt="a fox", width=512, height=512, steps=4, output_format="png")
PRICE = 40  # millicredits: 512x512 at 4 steps
T0 = datetime(2026, 11, 1, tzinfo=UTC)


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
    env: dict[str, str], url: str, workers: int, device_s: float, seconds: float, logs: Path
) -> dict[str, Any]:
    supervisor = Supervisor(restart=False)
    names = [f"sim{workers}-{i}" for i in range(workers)]
    groups = [names[i : i + THREADS_PER_PROCESS] for i in range(0, workers, THREADS_PER_PROCESS)]
    for index, group in enumerate(groups):
        supervisor.start(
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
    try:
        # Until every simulated worker sends heartbeats (a process imports torch first).
        from shared.redis_client import make_redis
        from shared.scheduling.fleet import live_workers

        client = make_redis(env["KOLORS_FARM_REDIS_URL"])
        deadline = time.monotonic() + 180
        while not set(names) <= set(live_workers(client)):
            if time.monotonic() > deadline:
                raise RuntimeError("the simulated workers did not start; see " + str(logs))
            time.sleep(0.2)
        time.sleep(max(2.0, 5 * device_s))  # the first releases and claims
        start = datetime.now(UTC)
        time.sleep(seconds)
        end = datetime.now(UTC)
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--device-s", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fleet.json"))
    parser.add_argument("--sim", help=argparse.SUPPRESS)  # internal: run simulated workers
    parser.add_argument("--gaps", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sim:
        sim_process(args.sim.split(","), args.device_s, Path(args.gaps))
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
        dispatcher = stack.enter_context(scratch_farm(env, workdir))
        dispatcher.start("dispatcher", "-m", "control", "dispatcher")
        print(f"simulated workers, device time {args.device_s} s per job (a sleep)")
        print(f"{'workers':>7} {'jobs/s':>8} {'ideal':>8} {'eff':>6} {'disp p50':>8} {'p95':>8}")
        for size in sizes:
            row = measure(env, url, size, args.device_s, args.seconds, workdir)
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
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"knee: {knee} workers; best {result['best_jobs_per_s']} jobs/s; wrote {args.out}")


if __name__ == "__main__":
    main()
