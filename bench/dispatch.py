"""Dispatch latency and control-plane overhead of the farm, against a bare diffusers loop.

Runs `kolors-farm up` (private Redis, one worker, the dispatcher, the API, SQLite or
the database in KOLORS_FARM_DATABASE_URL) on the tiny checkpoint, and measures:

- dispatch latency: from the job's commit (created_at) to its claim (started_at) on an
  idle worker, as the farm records them;
- per-job overhead: the farm's end-to-end time for one job (synchronous route, client
  side) minus a bare `KolorsPipeline` call with the same parameters on the same device;
- throughput: N jobs submitted at once, end to end, against the same N renders in a
  bare loop, as a ratio.

Prints a table and writes JSON (default bench/results/dispatch.json). Usage:

    .venv/bin/python bench/dispatch.py [--jobs 40] [--steps 25] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from control.processes import free_port  # noqa: E402
from worker.tiny import build_tiny_checkpoint  # noqa: E402


def bare_renders(model_dir: Path, params: dict[str, Any], count: int, threads: int) -> list[float]:
    """Seconds per call of a bare KolorsPipeline loop (the floor the farm is measured against)."""
    import torch
    from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline

    torch.set_num_threads(threads)
    pipe = KolorsPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    times = []
    for i in range(count + 1):
        started = time.perf_counter()
        image = pipe(
            prompt=params["prompt"],
            width=params["width"],
            height=params["height"],
            num_inference_steps=params["steps"],
            guidance_scale=6.0,
            generator=torch.Generator("cpu").manual_seed(i),
        ).images[0]
        image.save(os.devnull, format="WEBP", quality=80)
        if i:  # the first call warms up
            times.append(time.perf_counter() - started)
    del pipe
    return times


def start_farm(data_dir: Path, model_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        KOLORS_FARM_DATA_DIR=str(data_dir),
        KOLORS_FARM_MODEL=str(model_dir),
        KOLORS_FARM_DEVICE="cpu",
        # Every submission must render: the result cache would answer identical ones.
        KOLORS_FARM_CACHE="false",
        PYTHONPATH=str(REPO),
    )
    env.pop("KOLORS_FARM_REDIS_URL", None)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "farm.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "control", "up", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the farm exited: {(data_dir / 'farm.log').read_text()[-2000:]}")
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()
            if body.get("ready") and body.get("workers") and body.get("dispatcher"):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the farm did not become ready")


def create_user(data_dir: Path) -> str:
    env = dict(os.environ, KOLORS_FARM_DATA_DIR=str(data_dir), PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "control", "users", "create", "bench", "--credits", "100000"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().splitlines()[-1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dispatch.json")
    args = parser.parse_args()
    params = {"prompt": "a fox", "width": args.size, "height": args.size, "steps": args.steps}
    work = Path(tempfile.mkdtemp(prefix="kolors-farm-bench-"))
    model_dir = build_tiny_checkpoint(work / "tiny")
    threads = os.cpu_count() or 1  # what `up` gives its one CPU worker

    bare = bare_renders(model_dir, params, args.jobs, threads)
    port = free_port()
    farm = start_farm(work / "farm", model_dir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        headers = {"x-api-key": create_user(work / "farm")}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
            http.post("/v1/kolors", json=params).raise_for_status()  # warm-up
            round_trips, latencies = [], []
            for _ in range(args.jobs):  # one at a time, on an idle worker
                started = time.perf_counter()
                response = http.post("/v1/kolors", json=params)
                response.raise_for_status()
                round_trips.append(time.perf_counter() - started)
                result = http.get(f"/v2/requests/{response.headers['x-request-id']}").json()
                latencies.append(result["metrics"]["queue_seconds"])
            started = time.perf_counter()
            ids = [
                http.post("/v2/kolors", json=params).json()["request_id"] for _ in range(args.jobs)
            ]
            # One user's jobs run first in, first out: wait for the last, lightly, so that
            # polling does not steal the CPU the worker renders on.
            while http.get(f"/v2/requests/{ids[-1]}/status").json()["status"] != "COMPLETED":
                time.sleep(0.2)
            batch_s = time.perf_counter() - started
            statuses = {http.get(f"/v2/requests/{i}/status").json()["status"] for i in ids}
            assert statuses == {"COMPLETED"}, statuses
    finally:
        farm.send_signal(signal.SIGTERM)
        farm.wait(timeout=60)

    bare_mean = statistics.mean(bare)
    results = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "database": os.environ.get("KOLORS_FARM_DATABASE_URL", "sqlite (default)").split("@")[-1],
        "params": params,
        "jobs": args.jobs,
        "bare_render_s_mean": round(bare_mean, 4),
        "dispatch_latency_ms": {
            "p50": round(1000 * statistics.median(latencies), 1),
            "p95": round(1000 * percentile(latencies, 0.95), 1),
            "max": round(1000 * max(latencies), 1),
        },
        "sync_round_trip_s_mean": round(statistics.mean(round_trips), 4),
        "overhead_per_job_ms": round(1000 * (statistics.mean(round_trips) - bare_mean), 1),
        "batch_farm_s": round(batch_s, 3),
        "batch_bare_s": round(sum(bare), 3),
        "throughput_ratio": round(sum(bare) / batch_s, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        ("bare render (mean)", f"{bare_mean * 1000:.1f} ms"),
        ("dispatch latency p50 / p95 / max", "{p50} / {p95} / {max} ms".format(
            **results["dispatch_latency_ms"])),
        ("sync round trip (mean)", f"{results['sync_round_trip_s_mean'] * 1000:.1f} ms"),
        ("control-plane overhead per job", f"{results['overhead_per_job_ms']} ms"),
        (f"{args.jobs} jobs: farm vs bare loop", f"{batch_s:.2f} s vs {sum(bare):.2f} s"),
        ("throughput ratio (farm / bare)", f"{results['throughput_ratio']}"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
