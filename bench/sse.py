"""What idle event streams cost the API: other routes' latency, the process's memory and threads.

It runs the API as in production (gunicorn, `kolors-farm api`'s defaults: one process,
32 threads plus the stream threads) on SQLite and a private Redis, with two queued
requests (no dispatcher runs, so they stay queued), then measures, side by side:

- `GET /v2/requests/{id}/status` of a queued request, sequential, p50 and p99 ms, with 0
  event streams open, then with N (default 500) idle streams open on another queued
  request, then with 0 again once they closed (the run's noise);
- `GET /healthz` the same way;
- the API worker process's resident memory (RSS) and thread count, in both states;
- how long opening the N streams took, and, once the request is cancelled, how long until
  every stream got its final event and closed.

    .venv/bin/python bench/sse.py [--streams 500] [--polls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scratch import bench_user, farm_env, scratch_farm, scratch_redis  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def latencies(url: str, headers: dict[str, str], count: int) -> dict[str, float]:
    """Sequential GETs of `url`: p50 and p99 in ms (each must answer 200)."""
    times = []
    with httpx.Client(headers=headers, timeout=30) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(percentile(times, 0.99), 2),
    }


def process_figures(pid: int) -> dict[str, float]:
    """A process's resident memory (MiB) and threads, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return {
        "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "threads": int(fields["Threads"]),
    }


def gunicorn_worker(master: int) -> int:
    """The pid of the (single) worker process of a gunicorn master."""
    for task in Path(f"/proc/{master}/task").iterdir():
        children = (task / "children").read_text().split()
        if children:
            return int(children[0])
    raise RuntimeError("the API has no worker process")


async def hold_streams(
    url: str, headers: dict[str, str], count: int, measure: Any
) -> dict[str, Any]:
    """Open `count` streams, run `measure()` (in a thread) while they idle, then let them end."""
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    first = asyncio.Event()
    got_first = 0
    finals = 0
    async with httpx.AsyncClient(limits=limits, timeout=120, headers=headers) as client:

        async def one() -> None:
            nonlocal got_first, finals
            async with client.stream("GET", url) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("event: status"):
                        got_first += 1
                        if got_first == count:
                            first.set()
                    elif line.startswith("event: completed"):
                        finals += 1

        started = time.perf_counter()
        tasks = [asyncio.create_task(one()) for _ in range(count)]
        await asyncio.wait_for(first.wait(), 120)
        opened_s = time.perf_counter() - started
        await asyncio.sleep(1.0)  # let the burst settle: these streams are idle now
        figures: dict[str, Any] = await asyncio.to_thread(measure)
        started = time.perf_counter()
        await asyncio.gather(*tasks)
        assert finals == count, f"{finals} of {count} streams got their final event"
        return {
            **figures,
            "open_all_s": round(opened_s, 2),
            "all_final_after_cancel_s": round(time.perf_counter() - started, 2),
        }


def main() -> None:
    """Run the measurement and print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--polls", type=int, default=300)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sse.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kf-sse-") as tmp:
        workdir = Path(tmp)
        database_url = f"sqlite:///{workdir / 'farm.db'}"
        key = bench_user(database_url)
        headers = {"x-api-key": key}
        with (
            scratch_redis(workdir / "redis") as redis,
            scratch_farm(farm_env(workdir / "var", database_url, redis.url), workdir) as farm,
        ):
            base, api_pid = farm.start_api()
            # Two queued requests: the streams follow the first, the polls read the second.
            job_id, polled_id = (
                httpx.post(
                    f"{base}/v2/kolors",
                    json={"prompt": "a lighthouse", "width": 512, "height": 512},
                    headers=headers,
                ).json()["request_id"]
                for _ in range(2)
            )
            status_url = f"{base}/v2/requests/{polled_id}/status"
            worker = gunicorn_worker(api_pid)

            def measure() -> dict[str, Any]:
                return {
                    "status": latencies(status_url, headers, args.polls),
                    "healthz": latencies(f"{base}/healthz", {}, args.polls),
                    **process_figures(worker),
                }

            def measure_then_cancel() -> dict[str, Any]:
                figures = measure()
                httpx.post(f"{base}/v2/requests/{job_id}/cancel", headers=headers)
                return figures

            latencies(status_url, headers, 50)  # warm up the process and its pools
            idle = measure()
            events_url = f"{base}/v2/requests/{job_id}/events"
            busy = asyncio.run(hold_streams(events_url, headers, args.streams, measure_then_cancel))
            after = measure()  # the same route again once they closed: the run's noise
    result = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "api": "gunicorn gthread, 1 process, --threads 32 (+ stream threads), SQLite, Redis",
        "streams": args.streams,
        "polls": args.polls,
        "no_streams": idle,
        "with_streams": busy,
        "after_streams_closed": after,
    }
    print(f"{'':24}{'0 streams':>12}{f'{args.streams} idle streams':>20}{'0 again':>12}")
    for route in ("status", "healthz"):
        for figure in ("p50_ms", "p99_ms"):
            values = (idle[route][figure], busy[route][figure], after[route][figure])
            print(f"{route + ' ' + figure:24}{values[0]:>12}{values[1]:>20}{values[2]:>12}")
    for name, label in (("rss_mib", "API RSS (MiB)"), ("threads", "API threads")):
        print(f"{label:24}{idle[name]:>12}{busy[name]:>20}{after[name]:>12}")
    print(f"opening {args.streams} streams took {busy['open_all_s']} s; after the cancel, all got")
    print(f"their final event and closed within {busy['all_final_after_cancel_s']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
