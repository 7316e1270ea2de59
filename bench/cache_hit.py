"""Result cache: the latency of a hit against a miss (a real render), side by side in one run.

It runs a farm as in production on one machine: one worker process (CPU, the tiny
random-weight checkpoint: `KOLORS_FARM_MODEL=tiny`, so a "render" here is the real
pipeline on tiny weights, not Kolors), the dispatcher and the API under gunicorn, on
SQLite, a private Redis and local disk. Each round submits a request with a seed never
used before (a miss: queued, dispatched, rendered, stored, recorded), then the identical
request (a hit: answered from storage at submission), through two routes:

- async: `POST /v2/kolors`, then `GET /v2/requests/{id}` every 10 ms until COMPLETED
  (submit to result available, the links included);
- sync: `POST /v1/kolors` answering the image bytes (submit to image in hand).

Rounds alternate miss, hit, so a drifting machine treats both alike. The table gives
p50 and p95 milliseconds and the miss/hit ratio.

    .venv/bin/python bench/cache_hit.py [--rounds 20] [--steps 4] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scratch import bench_user, farm_env, scratch_farm, scratch_redis  # noqa: E402

POLL_S = 0.01


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def summary(samples: list[float]) -> dict[str, float]:
    """p50, p95 and mean of samples in seconds, as milliseconds."""
    return {
        "p50_ms": round(percentile(samples, 0.5) * 1000, 1),
        "p95_ms": round(percentile(samples, 0.95) * 1000, 1),
        "mean_ms": round(statistics.fmean(samples) * 1000, 1),
    }


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; RuntimeError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def async_round(client: httpx.Client, body: dict[str, Any]) -> tuple[float, bool]:
    """Submit, then poll the result until COMPLETED; seconds, and whether it was cached."""
    started = time.perf_counter()
    submitted = client.post("/v2/kolors", json=body)
    submitted.raise_for_status()
    request_id = submitted.json()["request_id"]
    while True:
        result = client.get(f"/v2/requests/{request_id}")
        answer = result.json()
        if answer["status"] == "COMPLETED":
            elapsed = time.perf_counter() - started
            return elapsed, all(output["cached"] for output in answer["outputs"])
        if answer["status"] == "FAILED":
            raise RuntimeError(f"request {request_id} failed: {answer.get('error')}")
        time.sleep(POLL_S)


def sync_round(client: httpx.Client, body: dict[str, Any]) -> float:
    """The synchronous route: submit to image bytes in hand, seconds."""
    started = time.perf_counter()
    response = client.post("/v1/kolors", json=body)
    response.raise_for_status()
    return time.perf_counter() - started


def run_rounds(
    base: str, key: str, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Once a worker is warm, the alternating rounds; the request and the samples by route."""
    client = httpx.Client(base_url=base, headers={"x-api-key": key}, timeout=300)

    def ready() -> bool:
        try:
            readiness = httpx.get(f"{base}/readyz", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        return any(info.get("warm") for info in readiness.get("workers", {}).values())

    wait_until(ready, 300, "a warm worker")
    body = {
        "prompt": "a lighthouse at dawn",
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "output_format": "png",
    }
    samples: dict[str, list[float]] = {
        "async_miss": [],
        "async_hit": [],
        "sync_miss": [],
        "sync_hit": [],
    }
    async_round(client, body | {"seed": 10**9})  # warm the API and the worker
    for number in range(args.rounds):
        seed = 1000 + 2 * number
        miss, cached = async_round(client, body | {"seed": seed})
        assert not cached, "a fresh seed must render"
        hit, cached = async_round(client, body | {"seed": seed})
        assert cached, "the identical request must be answered from the cache"
        samples["async_miss"].append(miss)
        samples["async_hit"].append(hit)
        samples["sync_miss"].append(sync_round(client, body | {"seed": seed + 1}))
        samples["sync_hit"].append(sync_round(client, body | {"seed": seed + 1}))
    return body, samples


def main() -> None:
    """Run the farm, measure misses and hits, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cache_hit.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kf-cache-") as tmp:
        workdir = Path(tmp)
        database_url = f"sqlite:///{workdir / 'farm.db'}"
        key = bench_user(database_url)
        with scratch_redis(workdir / "redis") as redis:
            env = farm_env(
                workdir / "var",
                database_url,
                redis.url,
                model="tiny",
                device="cpu",
                heartbeat_interval_s="1",
            )
            env["OMP_NUM_THREADS"] = "1"
            with scratch_farm(env, workdir) as farm:
                farm.start("worker", "-m", "worker", "worker", "--name", "bench-worker")
                farm.start("dispatcher", "-m", "control", "dispatcher")
                base, _ = farm.start_api()
                body, samples = run_rounds(base, key, args)
    figures = {name: summary(values) for name, values in samples.items()}
    result = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "farm": "1 CPU worker (tiny random-weight checkpoint), dispatcher, API (gunicorn), "
        "SQLite, private Redis, local disk",
        "request": body,
        "rounds": args.rounds,
        "figures": figures,
        "ratio_p50": {
            route: round(figures[f"{route}_miss"]["p50_ms"] / figures[f"{route}_hit"]["p50_ms"], 1)
            for route in ("async", "sync")
        },
    }
    print(f"{args.rounds} rounds, {args.size}x{args.size}, {args.steps} steps, tiny checkpoint")
    print(f"{'route':8}{'request':16}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}")
    labels = {"miss": "miss (render)", "hit": "hit (cache)"}
    for route in ("async", "sync"):
        for kind in ("miss", "hit"):
            row = figures[f"{route}_{kind}"]
            print(
                f"{route:8}{labels[kind]:16}"
                f"{row['p50_ms']:>10}{row['p95_ms']:>10}{row['mean_ms']:>10}"
            )
        print(f"{route:8}{'miss / hit p50':16}{result['ratio_p50'][route]:>10}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
