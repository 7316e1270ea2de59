"""Pipelined worker throughput: the farm's render path against a bare diffusers loop.

Both sides render the same jobs on the tiny checkpoint in one process, with the same
torch thread count, and both encode and save every image:

- bare: a plain loop, `KolorsPipeline(...)` then `image.save(path, format, quality)` for
  each image, one after the other (what a script on one machine would do);
- farm: the worker's own code path, `worker.render.start_render_job` for each job back to
  back (what the Celery task runs for each message), then `WorkerContext.close()` (the
  shutdown drain), on a real SQLite database, a private Redis and local disk. Each image is
  encoded with its generation record, written with fsync and rename, recorded and charged
  on the post-processing thread while the next image, or the next job, renders; the claim
  and each record are real transactions under a renewed lease, progress goes to Redis.

Job submission and release (the API's and the dispatcher's work) happen before the clock
starts. Rounds alternate (bare, farm, farm, bare, ...) so a machine whose load drifts
treats both sides alike. The ratio is the farm's images per second over the bare loop's:
above 1, the overlap hides more than the control plane costs. The "ideal" column is the
bare loop's total over its render time alone, the most any overlap could reach; "busy"
is the share of wall time each side spent inside the pipeline call (the farm's is the
worker's own busy_fraction since start, as its heartbeat reports it).

On a CPU the "device" is the CPU itself: the overlap gains only where encoding runs on a
core the render leaves free (torch threads below the core count), and it costs where it
takes a core the render wanted. A run of the defaults takes about 5 minutes on 2 cores.

Prints a table and writes JSON (default bench/results/overlap.json). Usage:

    .venv/bin/python bench/overlap.py [--quick] [--jobs 2] [--images 2] [--rounds 2]
        [--steps 25] [--threads 1,2] [--sizes 512,1024] [--formats webp,png]
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
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: waiting threads sleep instead of spinning on the core the
# post-processing thread needs (as `kolors-farm workers` runs its CPU workers).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline  # noqa: E402

from control.launcher import start_scratch_redis  # noqa: E402
from shared.accounts.users import Principal, create_user  # noqa: E402
from shared.db import make_engine, make_session_factory, transaction  # noqa: E402
from shared.jobs.params import KolorsParams  # noqa: E402
from shared.jobs.transitions import release_jobs, submit_job  # noqa: E402
from shared.migrate import migrate_database  # noqa: E402
from shared.models import Job, JobState  # noqa: E402
from shared.redis_client import make_redis  # noqa: E402
from shared.scheduling.fairshare import QueuedJob  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.storage import LocalStorage  # noqa: E402
from worker.busy import BusyMeter  # noqa: E402
from worker.context import WorkerContext  # noqa: E402
from worker.pipeline import KolorsRenderer  # noqa: E402
from worker.render import start_render_job  # noqa: E402
from worker.tiny import build_tiny_checkpoint  # noqa: E402

PIL_FORMATS = {"webp": "WEBP", "png": "PNG", "jpeg": "JPEG"}


@dataclass
class Side:
    """Seconds one side spent on its rounds, and the images it made."""

    seconds: float = 0.0
    images: int = 0
    render_s: list[float] = field(default_factory=list)  # bare only: per image
    save_s: list[float] = field(default_factory=list)  # bare only: encode and save
    busy: list[float] = field(default_factory=list)  # farm only: per round
    busy_s: float = 0.0  # farm only: inside pipeline calls


def bare_round(
    pipe: Any, params: KolorsParams, jobs: int, out_dir: Path, side: Side, seed: int
) -> None:
    """Render, encode and save every image of `jobs` jobs, one after the other."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for job in range(jobs):
        for index in range(params.number_of_images):
            t0 = time.perf_counter()
            image = pipe(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                width=params.width,
                height=params.height,
                num_inference_steps=params.steps,
                guidance_scale=params.cfg,
                generator=torch.Generator("cpu").manual_seed(seed + job * 100 + index),
            ).images[0]
            t1 = time.perf_counter()
            image.save(
                out_dir / f"{job}-{index}.{params.output_format}",
                format=PIL_FORMATS[params.output_format],
                quality=params.output_quality,
            )
            side.render_s.append(t1 - t0)
            side.save_s.append(time.perf_counter() - t1)
    side.seconds += time.perf_counter() - started
    side.images += jobs * params.number_of_images


def farm_round(
    context: WorkerContext, principal: Principal, params: KolorsParams, jobs: int, side: Side
) -> None:
    """Run `jobs` released jobs through the worker path back to back, then drain."""
    with transaction(context.sessions) as session:
        submitted = [submit_job(session, principal, params, Decimal(1)) for _ in range(jobs)]
        queued = [QueuedJob(j.id, j.tenant_id, j.user_id, j.created_at) for j in submitted]
        ids = release_jobs(session, queued)
    context.busy = BusyMeter()
    started = time.perf_counter()
    for job_id in ids:
        if start_render_job(context, job_id) is None:
            raise RuntimeError(f"job {job_id} was not claimable")
    context.close()
    side.seconds += time.perf_counter() - started
    side.busy.append(context.busy.fractions()[1])
    side.busy_s += context.busy.busy_s
    with transaction(context.sessions) as session:
        states = {session.get_one(Job, job_id).state for job_id in ids}
    if states != {JobState.COMPLETED.value}:
        raise RuntimeError(f"farm jobs ended {states}")
    side.images += jobs * params.number_of_images


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 job per round and side")
    parser.add_argument("--jobs", type=int, default=2, help="jobs per round and side")
    parser.add_argument("--images", type=int, default=2, help="images per job")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--threads",
        default=",".join(sorted({"1", str(os.cpu_count() or 1)}, key=int)),
        help="torch thread counts, comma separated (default: 1 and every core)",
    )
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--formats", default="webp,png")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "overlap.json")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.rounds = 1, 2
    work = Path(tempfile.mkdtemp(prefix="kolors-farm-overlap-"))
    model_dir = build_tiny_checkpoint(work / "tiny")
    scratch = start_scratch_redis(work / "redis")
    redis_process, redis_url = scratch.process, scratch.url
    database_url = f"sqlite:///{work / 'farm.db'}"
    migrate_database(database_url)
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        user, _key = create_user(session, "bench", "bench", 10**12)
        principal = Principal(user_id=user.id, tenant_id=user.tenant_id, user_name=user.name)
    settings = Settings(
        data_dir=work / "var", database_url=database_url, redis_url=redis_url, model=str(model_dir)
    )
    renderer = KolorsRenderer.load(settings, "cpu")
    context = WorkerContext(
        name="bench-cpu",
        settings=settings,
        sessions=sessions,
        redis=make_redis(redis_url),
        storage=LocalStorage(work / "results"),
        renderer=renderer,
    )
    pipe = KolorsPipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]

    rows: list[dict[str, Any]] = []
    print(HEADER, flush=True)
    try:
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for size in [int(s) for s in args.sizes.split(",")]:
                for output_format in args.formats.split(","):
                    params = KolorsParams(
                        prompt="a lighthouse at dusk",
                        width=size,
                        height=size,
                        steps=args.steps,
                        number_of_images=args.images,
                        output_format=output_format,
                    )
                    rows.append(
                        measure(args, params, threads, pipe, context, principal, work / "bare")
                    )
                    print(format_row(rows[-1]), flush=True)
    finally:
        redis_process.terminate()
        redis_process.wait(timeout=10)
        engine.dispose()

    results = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "measured": (
            "images per second of the worker path (start_render_job per job, back to back, "
            "then the drain; SQLite, private Redis, local disk with fsync) over a bare "
            "diffusers loop that renders, encodes and saves each image (PIL save, no fsync); "
            "same process, same torch threads, alternating rounds"
        ),
        "jobs_per_round": args.jobs,
        "images_per_job": args.images,
        "rounds": args.rounds,
        "steps": args.steps,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row))
    print(f"written to {args.out}")


def measure(
    args: argparse.Namespace,
    params: KolorsParams,
    threads: int,
    pipe: Any,
    context: WorkerContext,
    principal: Principal,
    bare_dir: Path,
) -> dict[str, Any]:
    """Warm both sides up at this size, then alternate rounds; one table row."""
    warm = params.model_copy(update={"number_of_images": 1, "steps": 2})
    bare_round(pipe, warm, 1, bare_dir, Side(), 0)
    farm_round(context, principal, warm, 1, Side())
    bare, farm = Side(), Side()
    for round_number in range(args.rounds):
        order = ("bare", "farm") if round_number % 2 == 0 else ("farm", "bare")
        for name in order:
            if name == "bare":
                bare_round(pipe, params, args.jobs, bare_dir, bare, seed=round_number * 1000)
            else:
                farm_round(context, principal, params, args.jobs, farm)
    bare_rate = bare.images / bare.seconds
    farm_rate = farm.images / farm.seconds
    return {
        "threads": threads,
        "size": params.width,
        "format": params.output_format,
        "images_per_side": bare.images,
        "bare_render_ms_per_image": round(1000 * statistics.mean(bare.render_s), 1),
        "bare_encode_save_ms_per_image": round(1000 * statistics.mean(bare.save_s), 1),
        # A render beside post-processing may be slower than one alone.
        "farm_render_ms_per_image": round(1000 * farm.busy_s / farm.images, 1),
        "bare_s": round(bare.seconds, 3),
        "farm_s": round(farm.seconds, 3),
        "bare_images_per_s": round(bare_rate, 4),
        "farm_images_per_s": round(farm_rate, 4),
        "throughput_ratio": round(farm_rate / bare_rate, 3),
        "ideal_ratio": round(bare.seconds / sum(bare.render_s), 3),
        # The share of wall time spent inside the pipeline call, on each side.
        "bare_busy_fraction": round(sum(bare.render_s) / bare.seconds, 3),
        "farm_busy_fraction": round(statistics.mean(farm.busy), 3),
    }


HEADER = (
    f"{'threads':>7} {'size':>5} {'format':>6} {'images':>6} {'render ms':>9} "
    f"{'farm render':>11} {'save ms':>8} {'bare s':>7} {'farm s':>7} {'ratio':>6} {'ideal':>6} "
    f"{'busy bare':>9} {'busy farm':>9}"
)


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['threads']:>7} {row['size']:>5} {row['format']:>6} {row['images_per_side']:>6} "
        f"{row['bare_render_ms_per_image']:>9} {row['farm_render_ms_per_image']:>11} "
        f"{row['bare_encode_save_ms_per_image']:>8} "
        f"{row['bare_s']:>7} {row['farm_s']:>7} {row['throughput_ratio']:>6} "
        f"{row['ideal_ratio']:>6} {row['bare_busy_fraction']:>9} {row['farm_busy_fraction']:>9}"
    )


if __name__ == "__main__":
    main()
