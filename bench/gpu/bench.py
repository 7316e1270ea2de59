"""Full-size Kolors and the whole farm on a GPU, in one command with a time budget.

    python bench/gpu/bench.py OUTDIR [--stages a,b,c,d,e] [--profile full|tiny] [--budget-s 540]

(bench/gpu/run.sh installs the wheel bundle first where the farm's dependencies are
missing, then runs this.) Stages, each printing its table rows and appending JSON
lines to OUTDIR/results.jsonl as soon as it has them:

  a  eager diffusers fp16, batch 1: s/image, it/s, peak memory (median after a warm-up)
  b  optimisation levels in the same run: no SDPA, SDPA, bf16, channels-last, compile
  c  `kolors-farm up` with one worker rendering N jobs over HTTP, against a bare loop
  d  2048x2048 and ten 1024x1024 images under a 24 GiB cap, against the memory model
  e  cold start: worker process start to ready, against a bare from_pretrained().to()

Weights are random (built on the device from bench/gpu/kolors-config) unless
KOLORS_FARM_MODEL (or --model) names a real checkpoint; the farm's other KOLORS_FARM_*
settings apply. Every task runs in a child forked from this process (which has
imported torch and diffusers but never touched CUDA), under a time limit taken from
the budget, so a crash or a slow compile costs only that task. The compile levels of
stage b run last for the same reason: they are the ones whose time is hard to predict.
Tasks run one at a time (`--parallel 1`, the full profile's default); the CPU
rehearsal (`--profile tiny`), whose times mean nothing, runs three at once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(HERE), str(REPO)]
# An NVML device count instead of a CUDA one: this process forks its tasks, and a CUDA
# context made before a fork is unusable in the child.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
# OpenMP threads that spin while they wait lose their cores to the farm's other processes
# and slow CPU renders many times over (the farm's CPU workers set the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import stages  # noqa: E402

STAGES = ("a", "b", "c", "d", "e")


@dataclass(frozen=True)
class Task:
    """One child process: the stages function it runs (by name, so spawn can pickle it)."""

    name: str
    stage: str
    function: str
    args: tuple[str, ...]
    cap_s: float
    expected_s: float
    needs: tuple[str, ...] = ()  # tasks that must have ended before this one starts

    def run(self, ctx: stages.Context) -> None:
        """Run the task's function (in the child)."""
        getattr(stages, self.function)(ctx, *self.args)


def plan(selected: list[str], profile: stages.Profile, real_model: str | None) -> list[Task]:
    """The tasks for the chosen stages, in the order they run."""
    tasks: list[Task] = []
    if "a" in selected:
        tasks.append(Task("a", "a", "stage_a", (), 180, 40))
    # Stage b's speedups divide by stage a's time and by b's own fp16 level: those rows
    # must exist first, even when the CPU rehearsal runs tasks side by side.
    if "b" in selected:
        tasks.append(Task("b-eager", "b", "stage_b_eager", (), 240, 80, ("a",)))
    if not real_model and ("c" in selected or "e" in selected):
        tasks.append(Task("save", "save", "save_checkpoint", (), 300, 60))
    # c and e run the farm's processes on the checkpoint the save task writes.
    saved = ("save",) if not real_model else ()
    if "c" in selected:
        tasks.append(Task("c", "c", "stage_c", (), 300, 90, saved))
    if "d" in selected:
        tasks.append(Task("d", "d", "stage_d", (), 240, 60))
    if "e" in selected:
        tasks.append(Task("e", "e", "stage_e", (), 300, 80, saved))
    if "b" in selected:
        for mode in profile.compile_modes:
            needs = ("a", "b-eager")
            name = f"b-compile-{mode}"
            tasks.append(Task(name, "b", "stage_b_compile", (mode,), 480, 150, needs))
    return tasks


def _child(task: Task, ctx: stages.Context) -> None:
    """The child: run the task, record any error as a row, never raise."""

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        # Unwinds through the task's `finally` blocks, which stop its farm processes.
        raise TimeoutError(f"task {task.name} ran out of time")

    signal.signal(signal.SIGTERM, on_term)
    import torch

    if torch.cuda._is_in_bad_fork():
        ctx.recorder.write(
            {"stage": task.stage, "name": task.name, "ok": False,
             "error": "CUDA was initialised before the fork"}
        )  # fmt: skip
        os._exit(3)
    started = time.perf_counter()
    try:
        task.run(ctx)
    except BaseException as exc:  # the row says what happened; the parent goes on
        traceback.print_exc()
        row = {
            "stage": task.stage,
            "name": task.name,
            "profile": ctx.profile.name,
            **stages.error_fields(exc),
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
        if isinstance(exc, torch.OutOfMemoryError):
            row["oom"] = True
        ctx.recorder.write(row)
    sys.stdout.flush()
    sys.stderr.flush()


def _start_method() -> str:
    """fork, unless CUDA is initialised here, which a forked child could not use."""
    import torch

    # A forked child has torch and diffusers imported already; spawn imports them again.
    forced = os.environ.get("GPU_BENCH_START_METHOD")
    initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    return forced or ("spawn" if initialized else "fork")


@dataclass
class Running:
    """A task's child process, and when it started and must end."""

    task: Task
    process: Any
    started: float
    until: float


def start_task(task: Task, ctx: stages.Context, timeout_s: float) -> Running:
    """Start the task's child process."""
    context: Any = multiprocessing.get_context(_start_method())
    process = context.Process(target=_child, args=(task, ctx), name=task.name)
    process.start()
    now = time.monotonic()
    return Running(task, process, now, now + timeout_s)


def finish_task(running: Running, ctx: stages.Context) -> str:
    """The outcome of a child that ended, or stop one past its time: a word for each."""
    task, process = running.task, running.process
    if process.is_alive():
        _stop(process)
        ctx.recorder.write(
            {"stage": task.stage, "name": task.name, "profile": ctx.profile.name, "ok": False,
             "error": f"timed out after {running.until - running.started:.0f} s (the budget); "
                      "rows above were kept", "timeout": True}
        )  # fmt: skip
        return "timeout"
    if process.exitcode != 0:
        ctx.recorder.write(
            {"stage": task.stage, "name": task.name, "profile": ctx.profile.name, "ok": False,
             "error": f"the task's process died (exit code {process.exitcode})"}
        )  # fmt: skip
        return "crashed"
    return "done"


def schedule(
    tasks: list[Task], ctx: stages.Context, deadline: float, parallel: int
) -> dict[str, str]:
    """Run the tasks in order, at most `parallel` at once, each within its share of the time.

    A GPU run takes them one at a time (timings need the device to themselves); the CPU
    rehearsal, whose times mean nothing, runs several side by side to stay short.
    """
    outcomes: dict[str, str] = {}
    pending = list(tasks)
    running: list[Running] = []

    def ready(task: Task) -> bool:
        busy = {t.name for t in pending} | {r.task.name for r in running}
        return not busy & set(task.needs)

    try:
        while pending or running:
            while len(running) < parallel:
                task = next((t for t in pending if ready(t)), None)
                if task is None:
                    break
                pending.remove(task)
                remaining = deadline - time.monotonic()
                # Leave the later tasks their expected time; the compile tasks come last and
                # take whatever is left.
                later = sum(t.expected_s for t in pending if t.function != "stage_b_compile")
                share = min(remaining, task.expected_s)
                timeout = min(task.cap_s, max(remaining - later / parallel, share))
                if timeout < 5:
                    ctx.recorder.write(
                        {"stage": task.stage, "name": task.name, "profile": ctx.profile.name,
                         "ok": False, "skipped": True, "error": "no time left in the budget"}
                    )  # fmt: skip
                    outcomes[task.name] = "skipped"
                    continue
                print(f"--- {task.name} (at most {timeout:.0f} s)", flush=True)
                running.append(start_task(task, ctx, timeout))
            if not running:
                continue  # the budget ran out: every task left was skipped
            soonest = min(r.until for r in running)
            sentinels = [r.process.sentinel for r in running]
            multiprocessing.connection.wait(sentinels, max(0.05, soonest - time.monotonic()))
            for job in list(running):
                if job.process.is_alive() and time.monotonic() < job.until:
                    continue
                job.process.join(1)
                outcome = finish_task(job, ctx)
                outcomes[job.task.name] = outcome
                elapsed = time.monotonic() - job.started
                print(f"--- {job.task.name}: {outcome} in {elapsed:.1f} s", flush=True)
                running.remove(job)
        return outcomes
    except KeyboardInterrupt:
        for job in running:
            _stop(job.process)
        raise


def _stop(process: Any) -> None:
    """SIGTERM (the child unwinds and stops its own processes), then SIGKILL."""
    process.terminate()
    process.join(60)
    if process.is_alive():
        process.kill()
        process.join(10)


def environment(profile: str, real_model: str | None, argv: list[str]) -> dict[str, Any]:
    """Versions and the GPU, read without creating a CUDA context here."""
    import diffusers
    import torch
    import transformers

    gpu = None
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm"
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        gpu = out.stdout.strip() or out.stderr.strip()
    return {
        "stage": "env",
        "name": "environment",
        "profile": profile,
        "weights": real_model or "random",
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "argv": argv,
    }


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, checked against what was measured (None: not measured)."""
    timed = [r for r in rows if r.get("stage") in ("a", "b") and r.get("s_per_image")]
    eager = next((r["s_per_image"] for r in rows if r.get("stage") == "a" and
                  r.get("s_per_image")), None)  # fmt: skip
    best = min(timed, key=lambda r: r["s_per_image"]) if timed else None
    farm = next((r for r in rows if r.get("stage") == "c" and r.get("throughput_ratio")), None)
    cold = next((r for r in rows if r.get("stage") == "e" and r.get("ratio")), None)
    memory = [r for r in rows if r.get("stage") == "d" and "model_holds" in r]

    def check(value: float | None, ok: Callable[[float], bool]) -> dict[str, Any]:
        return {"value": value, "met": None if value is None else ok(value)}

    return {
        "best_level": best["name"] if best else None,
        "s_per_image_at_most_1.0": check(best["s_per_image"] if best else None, lambda v: v <= 1.0),
        "speedup_over_eager_fp16_at_least_1.5": check(
            round(eager / best["s_per_image"], 3) if eager and best else None, lambda v: v >= 1.5
        ),
        "farm_vs_bare_at_least_1.0": check(
            farm["throughput_ratio"] if farm else None, lambda v: v >= 1.0
        ),
        "cold_start_vs_bare_at_most_1.2": check(
            cold["ratio"] if cold else None, lambda v: v <= 1.2
        ),
        "memory_no_crash": None if not memory else all(not r.get("oom") for r in memory),
        "memory_model_holds": None
        if not memory or any(r.get("model_holds") is None for r in memory)
        else all(r["model_holds"] for r in memory),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the selected stages within the budget; 0 when every task ran to its end."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    profile = stages.PROFILES[args.profile]
    if args.repeats:
        profile = _replace(profile, repeats=args.repeats)
    if args.jobs:
        profile = _replace(profile, farm_jobs=args.jobs)
    if args.compile_modes is not None:
        modes = tuple(m for m in args.compile_modes.split(",") if m)
        profile = _replace(profile, compile_modes=modes)
    selected = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(selected) - set(STAGES))
    if unknown:
        print(f"unknown stage(s): {', '.join(unknown)}; choose among {','.join(STAGES)}")
        return 2
    real = args.model if args.model is not None else os.environ.get("KOLORS_FARM_MODEL")
    # `tiny` is the farm's own stand-in (and the Makefile's default): random weights here.
    real_model = real if real and real != "tiny" else None
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.gettempdir()) / "kolors-gpu-bench").resolve()
    work.mkdir(parents=True, exist_ok=True)
    recorder = stages.Recorder(out)
    ctx = stages.Context(profile, out, work, real_model, recorder)
    if profile.name == "full" and not _cuda_device(ctx):
        print("the full profile needs a CUDA device (8.9 B parameters, 18 GB in half precision);")
        print("--profile tiny rehearses every stage on the CPU")
        return 2
    recorder.write(environment(profile.name, real_model, sys.argv))

    deadline = time.monotonic() + args.budget_s
    tasks = plan(selected, profile, real_model)

    def on_term(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        outcomes = schedule(tasks, ctx, deadline, args.parallel or profile.parallel)
    except KeyboardInterrupt:
        print("stopped by a signal; the rows written so far are in results.jsonl", flush=True)
        return 1
    summary = {"stage": "summary", "name": "targets", "profile": profile.name,
               "tasks": outcomes, "targets": targets(recorder.rows())}  # fmt: skip
    recorder.write(summary)
    print(json.dumps(summary["targets"], indent=2), flush=True)
    failed = [r for r in recorder.rows() if r.get("ok") is False]
    return 0 if not failed and all(v == "done" for v in outcomes.values()) else 1


def _cuda_device(ctx: stages.Context) -> bool:
    """Whether the farm's device setting picks a CUDA device (NVML's count: fork-safe)."""
    try:
        return ctx.device.type == "cuda"
    except RuntimeError:
        return False


def _replace(profile: stages.Profile, **changes: Any) -> stages.Profile:
    from dataclasses import replace

    return replace(profile, **changes)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path, help="folder for results.jsonl and logs")
    parser.add_argument("--stages", default=",".join(STAGES), help="e.g. a,b or c")
    parser.add_argument("--profile", choices=sorted(stages.PROFILES), default="full")
    parser.add_argument("--budget-s", type=float, default=540.0, help="all tasks together")
    parser.add_argument("--model", default=None, help="a real checkpoint (else KOLORS_FARM_MODEL)")
    parser.add_argument("--work", type=Path, default=None, help="scratch (checkpoint, farm data)")
    parser.add_argument("--repeats", type=int, default=0, help="timed renders per level")
    parser.add_argument("--jobs", type=int, default=0, help="stage c's jobs")
    parser.add_argument("--compile-modes", default=None, help="e.g. default,max-autotune")
    parser.add_argument("--parallel", type=int, default=0, help="tasks at once (timings need 1)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
