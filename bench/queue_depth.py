"""Control-plane cost against queue depth: the release decision and a queued job's status.

For each database (SQLite, PostgreSQL), each mix of users and each depth (1k, 10k,
100k queued jobs), it builds a queue, then measures:

- decision: the dispatcher's release decision (`next_in_fair_order`, 8 slots), median ms;
- place: a queued job's position and work ahead (`queue_place`), median ms;
- poll latency: `GET /v2/requests/{id}/status` of that queued job over HTTP through the real
  API (gunicorn), p50 and p95 ms, sequential;
- poll throughput: that queued job's status against a finished job's, requests/s, measured
  side by side by the same concurrent clients, and their ratio.

The polled job is the deepest one the mix has: the newest job of the user with the most.

Mixes (N queued jobs):
- heavy: 200 users, each in its own tenant; one holds half the queue, the rest share the other half;
- crowd: N users with one job each, each in its own tenant (so 100,000 users at 100k);
- weighted: 20 tenants of weights 1 to 4 with 10 users each (user weights 1 to 3), jobs skewed.

The queue is written with bulk inserts (the rows `submit_job` would write, without the
ledger's holds, which no read here touches), and 8 jobs are in flight. On PostgreSQL the
tables are then analyzed, as autovacuum would do within a minute of such a load.

    .venv/bin/python bench/queue_depth.py [--depths 1000,10000,100000]
        [--databases sqlite,postgresql] [--mixes heavy,crowd,weighted] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scratch import farm_env, scratch_farm, scratch_redis  # noqa: E402
from shared.accounts.users import create_api_key  # noqa: E402
from shared.db import make_engine, make_session_factory, read_only, transaction  # noqa: E402
from shared.jobs.params import KolorsParams  # noqa: E402
from shared.migrate import migrate_database  # noqa: E402
from shared.models import Job, Tenant, TenantQueue, User, UserQueue  # noqa: E402
from shared.scheduling.order import next_in_fair_order  # noqa: E402
from shared.scheduling.positions import queue_place  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "KOLORS_FARM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PARAMS = KolorsParams(prompt="a fox in the snow", width=512, height=512, steps=25)
WORK = 512 * 512 * 25
T0 = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass
class Queue:
    """What the measurements need of a built queue."""

    polled_job: str
    finished_job: str
    key: str


def user_plan(mix: str, depth: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
    """(tenant index, tenant weight, user weight, queued jobs) per user."""
    if mix == "heavy":
        others = 199
        rest = depth - depth // 2
        plan = [(0, 1, 1, depth // 2)]
        plan += [(i + 1, 1, 1, rest // others + (i < rest % others)) for i in range(others)]
        return plan
    if mix == "crowd":
        return [(i, 1, 1, 1) for i in range(depth)]
    if mix == "weighted":
        shares = [1 / (rank + 1) for rank in range(200)]  # Zipf-like: a few users hold most
        total = sum(shares)
        counts = [int(depth * share / total) for share in shares]
        counts[0] += depth - sum(counts)
        rng.shuffle(counts)
        return [(u // 10, 1 + (u // 10) % 4, 1 + u % 3, counts[u]) for u in range(200)]
    raise ValueError(mix)


def build_queue(url: str, mix: str, depth: int) -> Queue:
    """Write tenants, users, their lines and `depth` waiting jobs (plus 8 in flight)."""
    rng = random.Random(7)
    plan = user_plan(mix, depth, rng)
    engine = make_engine(url)
    params = PARAMS.render_fields()
    with engine.begin() as connection:
        tenant_count = max(t for t, _, _, _ in plan) + 1
        tenant_weight = {t: w for t, w, _, _ in plan}
        connection.execute(
            sa.insert(Tenant),
            [
                {"id": t + 1, "name": f"t{t}", "weight": tenant_weight[t], "created_at": T0}
                for t in range(tenant_count)
            ],
        )
        connection.execute(
            sa.insert(User),
            [
                {
                    "id": u + 1,
                    "tenant_id": t + 1,
                    "name": f"u{u}",
                    "weight": w,
                    "balance": 10**9,
                    "created_at": T0,
                }
                for u, (t, _, w, _) in enumerate(plan)
            ],
        )
        jobs: list[dict[str, Any]] = []
        lines: list[dict[str, Any]] = []
        newest: dict[int, str] = {}
        clock = 0
        for u, (t, _, _, count) in enumerate(plan):
            ids = []
            for seq in range(count):
                clock += 1
                job_id = uuid.uuid4().hex
                ids.append((job_id, T0 + timedelta(microseconds=clock * 10)))
                jobs.append(job_row(job_id, t + 1, u + 1, ids[-1][1], params, queue_seq=seq))
            if ids:
                newest[u] = ids[-1][0]
            lines.append(
                {
                    "user_id": u + 1,
                    "tenant_id": t + 1,
                    "waiting": count,
                    "in_flight": 0,
                    "waiting_work": count * WORK,
                    "head_seq": 0,
                    "head_job_id": ids[0][0] if ids else None,
                    "head_created_at": ids[0][1] if ids else None,
                    "tail_job_id": ids[-1][0] if ids else None,
                    "tail_created_at": ids[-1][1] if ids else None,
                    "last_created_at": ids[-1][1] if ids else None,
                }
            )
        # Eight jobs in flight, for the first eight users (as eight busy workers would hold).
        for u in range(min(8, len(plan))):
            clock += 1
            row = job_row(uuid.uuid4().hex, plan[u][0] + 1, u + 1, T0, params, queue_seq=0)
            row |= {
                "state": "RUNNING",
                "released_at": T0,
                "started_at": T0,
                "attempt": 1,
                "lease_expires_at": datetime.now(UTC) + timedelta(days=1),
            }
            jobs.append(row)
            lines[u]["in_flight"] = 1
        busiest = max(range(len(plan)), key=lambda u: (plan[u][3], -u))
        finished = job_row(
            uuid.uuid4().hex, plan[busiest][0] + 1, busiest + 1, T0, params, queue_seq=0
        )
        finished |= {
            "state": "COMPLETED",
            "released_at": T0,
            "started_at": T0,
            "finished_at": T0,
            "attempt": 1,
            "images_done": 1,
        }
        jobs.append(finished)
        for start in range(0, len(jobs), 5000):
            connection.execute(sa.insert(Job), jobs[start : start + 5000])
        for start in range(0, len(lines), 5000):
            connection.execute(sa.insert(UserQueue), lines[start : start + 5000])
        user_weight = {u + 1: w for u, (_, _, w, _) in enumerate(plan)}
        rows = tenant_rows(lines, user_weight, {t + 1: w for t, w in tenant_weight.items()})
        for start in range(0, len(rows), 5000):
            connection.execute(sa.insert(TenantQueue), rows[start : start + 5000])
    with transaction(make_session_factory(engine)) as session:
        key = create_api_key(session, busiest + 1)
    engine.dispose()
    return Queue(polled_job=newest[busiest], finished_job=finished["id"], key=key)


def tenant_rows(
    lines: list[dict[str, Any]], user_weight: dict[int, int], tenant_weight: dict[int, int]
) -> list[dict[str, Any]]:
    """Each tenant's queue row, summed from its users' lines as `scheduling.lines` keeps it."""
    by_tenant: dict[int, list[dict[str, Any]]] = {t: [] for t in tenant_weight}
    for line in lines:
        by_tenant[line["tenant_id"]].append(line)
    rows = []
    for tenant_id, members in by_tenant.items():
        waiting = sum(m["waiting"] for m in members)
        in_flight = sum(m["in_flight"] for m in members)
        heads = [m for m in members if m["waiting"]]
        first = min(
            heads,
            key=lambda m: (
                Fraction(m["in_flight"] + 1, user_weight[m["user_id"]]),
                m["head_created_at"],
                m["head_job_id"],
            ),
            default=None,
        )
        rows.append(
            {
                "tenant_id": tenant_id,
                "weight": tenant_weight[tenant_id],
                "waiting": waiting,
                "in_flight": in_flight,
                "waiting_work": sum(m["waiting_work"] for m in members),
                "first_vt": (in_flight + 1) / tenant_weight[tenant_id] if waiting else None,
                "first_user_id": first["user_id"] if first else None,
                "first_job_id": first["head_job_id"] if first else None,
                "first_created_at": first["head_created_at"] if first else None,
                "oldest_created_at": min((m["head_created_at"] for m in heads), default=None),
                "newest_created_at": max((m["tail_created_at"] for m in heads), default=None),
            }
        )
    return rows


def job_row(
    job_id: str, tenant_id: int, user_id: int, created_at: datetime, params: dict[str, Any],
    *, queue_seq: int,
) -> dict[str, Any]:  # fmt: skip
    return {
        "id": job_id,
        "tenant_id": tenant_id,
        "user_id": user_id,
        "state": "QUEUED",
        "params": params,
        "seed": 1,
        "number_of_images": 1,
        "images_done": 0,
        "price_per_image": 250,
        "attempt": 0,
        "cancel_requested": False,
        "created_at": created_at,
        "released_at": None,
        "started_at": None,
        "finished_at": None,
        "lease_expires_at": None,
        "deadline_at": None,
        "expires_at": created_at + timedelta(days=30),
        "queue_seq": queue_seq,
        "work": WORK,
    }


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm caches and connections
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def domain_costs(url: str, queue: Queue, repeats: int) -> dict[str, float]:
    engine = make_engine(url)
    sessions = make_session_factory(engine)

    def decide() -> None:
        with read_only(sessions) as session:
            assert len(next_in_fair_order(session, 8, 0)) == 8

    def place() -> None:
        with read_only(sessions) as session:
            queue_place(session, session.get_one(Job, queue.polled_job))

    with read_only(sessions) as session:
        position = queue_place(session, session.get_one(Job, queue.polled_job)).position
    costs = {
        "decision_ms": median_ms(decide, repeats),
        "place_ms": median_ms(place, repeats),
        "position": position,
    }
    engine.dispose()
    return costs


def poll_latency(url: str, key: str, count: int) -> tuple[float, float]:
    with httpx.Client(headers={"x-api-key": key}, timeout=60) as client:
        client.get(url).raise_for_status()
        times = []
        for _ in range(count):
            started = time.perf_counter()
            client.get(url).raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def poll_throughput(url: str, key: str, clients: int, seconds: float) -> float:
    """Requests per second that `clients` keep-alive clients get for one URL."""
    done = [0] * clients
    stop = time.monotonic() + seconds

    def hammer(slot: int) -> None:
        with httpx.Client(headers={"x-api-key": key}, timeout=60) as client:
            while time.monotonic() < stop:
                client.get(url).raise_for_status()
                done[slot] += 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


def http_costs(
    db_url: str, redis_url: str, data_dir: Path, queue: Queue, quick: bool
) -> dict[str, float]:
    with scratch_farm(farm_env(data_dir, db_url, redis_url), data_dir) as farm:
        base, _ = farm.start_api("--threads", "8")
        queued_url = f"{base}/v2/requests/{queue.polled_job}/status"
        finished_url = f"{base}/v2/requests/{queue.finished_job}/status"
        body = httpx.get(queued_url, headers={"x-api-key": queue.key}).json()
        assert body["status"] == "QUEUED" and "queue_position" in body, body
        p50, p95 = poll_latency(queued_url, queue.key, 60 if quick else 200)
        seconds = 1.5 if quick else 4.0
        queued_rates, finished_rates = [], []
        for _ in range(2):  # interleaved, so drift in the machine's load hits both alike
            queued_rates.append(poll_throughput(queued_url, queue.key, 4, seconds))
            finished_rates.append(poll_throughput(finished_url, queue.key, 4, seconds))
        queued, finished = statistics.mean(queued_rates), statistics.mean(finished_rates)
        return {
            "poll_p50_ms": p50,
            "poll_p95_ms": p95,
            "queued_rps": queued,
            "finished_rps": finished,
            "rps_ratio": queued / finished,
            "queue_position": body["queue_position"],
        }


def gather_statistics(url: str) -> None:
    """ANALYZE the bulk-loaded tables, as autovacuum does within a minute of such a load.

    A queue that fills over time is analyzed along the way (10% of a table changed);
    one written in a single bulk transaction is not, and PostgreSQL would plan the
    first minute's queries for empty tables.
    """
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE")
    engine.dispose()


def fresh_database(kind: str, workdir: Path, name: str) -> tuple[str, Callable[[], None]]:
    if kind == "sqlite":
        path = workdir / f"{name}.db"

        def drop_sqlite() -> None:
            for leftover in workdir.glob(f"{name}.db*"):
                leftover.unlink(missing_ok=True)

        return f"sqlite:///{path}", drop_sqlite
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    database = f"kf_bench_{name}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
    url = sa.make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(False)

    def drop() -> None:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    return url, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="1000,10000,100000")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--mixes", default="heavy,crowd,weighted")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "queue_depth.json"))
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    repeats = 5 if args.quick else 30
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kf-bench-") as tmp:
        workdir = Path(tmp)
        with scratch_redis(workdir / "redis") as scratch:
            redis_url = scratch.url
            for kind in args.databases.split(","):
                for mix in args.mixes.split(","):
                    for depth in depths:
                        name = f"{mix}{depth}"
                        url, drop = fresh_database(kind, workdir, name)
                        try:
                            migrate_database(url)
                            started = time.perf_counter()
                            queue = build_queue(url, mix, depth)
                            built_s = time.perf_counter() - started
                            if kind == "postgresql":
                                gather_statistics(url)
                            row: dict[str, Any] = {"database": kind, "mix": mix, "depth": depth}
                            row |= domain_costs(url, queue, repeats)
                            row |= http_costs(url, redis_url, workdir / name, queue, args.quick)
                            row["build_s"] = round(built_s, 1)
                            rows.append(row)
                            print_row(row, header=len(rows) == 1)
                        finally:
                            drop()
    growth = growth_table(rows, depths)
    result = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "polled_job": "the newest job of the user with the most queued jobs",
        "note": "queues written with bulk inserts (then ANALYZE on PostgreSQL, as autovacuum "
        "would); 8 jobs in flight; decision = 8 slots",
        "rows": rows,
        "growth_smallest_to_largest_depth": growth,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"growth from {depths[0]:,} to {depths[-1]:,} queued (ratio of medians):")
    for item in growth:
        print(
            f"  {item['database']:<10} {item['mix']:<9} decision x{item['decision']:.2f}  "
            f"place x{item['place']:.2f}  poll p50 x{item['poll_p50']:.2f}  "
            f"queued/finished rps at {depths[-1]:,}: {item['rps_ratio_at_largest']:.2f}"
        )
    print(f"wrote {args.out}")


COLUMNS = (
    ("database", "{:<10}"),
    ("mix", "{:<9}"),
    ("depth", "{:>7,}"),
    ("position", "{:>7,}"),
    ("decision_ms", "{:>9.2f}"),
    ("place_ms", "{:>8.2f}"),
    ("poll_p50_ms", "{:>8.2f}"),
    ("poll_p95_ms", "{:>8.2f}"),
    ("queued_rps", "{:>8.0f}"),
    ("finished_rps", "{:>8.0f}"),
    ("rps_ratio", "{:>6.2f}"),
)


def print_row(row: dict[str, Any], header: bool) -> None:
    if header:
        print(" ".join(f"{name:>{len(fmt.format(row[name]))}}" for name, fmt in COLUMNS))
    print(" ".join(fmt.format(row[name]) for name, fmt in COLUMNS), flush=True)


def growth_table(rows: list[dict[str, Any]], depths: list[int]) -> list[dict[str, Any]]:
    out = []
    for kind in dict.fromkeys(r["database"] for r in rows):
        for mix in dict.fromkeys(r["mix"] for r in rows):
            by_depth = {r["depth"]: r for r in rows if r["database"] == kind and r["mix"] == mix}
            if depths[0] not in by_depth or depths[-1] not in by_depth:
                continue
            low, high = by_depth[depths[0]], by_depth[depths[-1]]
            out.append(
                {
                    "database": kind,
                    "mix": mix,
                    "decision": high["decision_ms"] / low["decision_ms"],
                    "place": high["place_ms"] / low["place_ms"],
                    "poll_p50": high["poll_p50_ms"] / low["poll_p50_ms"],
                    "rps_ratio_at_largest": high["rps_ratio"],
                }
            )
    return out


if __name__ == "__main__":
    main()
