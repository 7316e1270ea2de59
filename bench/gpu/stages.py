"""The measurements of the GPU benchmark, one function per task; bench.py runs them.

Every task builds what it measures itself (a forked child of bench.py runs it), so a
crash, an out-of-memory error or a time-out costs that task alone. Each writes its
rows to the results file as soon as it has them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import model
import numpy as np
import torch
from PIL import Image

from control.launcher import start_scratch_redis
from control.processes import free_port
from shared.jobs.params import KolorsParams
from shared.settings import Settings
from worker.memory import MIB, MemoryModel, images_per_call, plan_chunks
from worker.pipeline import KolorsRenderer, resolve_device, resolve_dtype

GIB = 1024**3
PROMPT = "a red fox sitting in the snow, soft morning light, highly detailed"
NEGATIVE = "blurry, low quality"
CFG = 6.0


@dataclass(frozen=True)
class Profile:
    """Sizes of one run: `full` is the real model on a GPU, `tiny` the CPU rehearsal."""

    name: str
    config_dir: Path
    size: int  # stages a and b: size x size
    steps: int
    repeats: int  # timed renders after one warm-up; the median is reported
    farm_size: int  # stage c goes through the API, which takes 512 to 2048
    farm_steps: int
    farm_jobs: int
    big_size: int  # stage d: one image this large ...
    many_size: int  # ... and `many` images this large
    many: int
    memory_budget_gib: float | None  # stage d's per-process memory cap; None: no cap (CPU)
    compile_backend: str  # inductor on a GPU; the tiny run only checks the path
    compile_modes: tuple[str, ...]
    # Tasks at once: 1 where times matter; the CPU rehearsal's mean nothing, and running
    # its tasks side by side keeps it short.
    parallel: int


PROFILES = {
    "full": Profile(
        name="full",
        config_dir=model.CONFIGS["full"],
        size=1024,
        steps=25,
        repeats=5,
        farm_size=1024,
        farm_steps=25,
        farm_jobs=8,
        big_size=2048,
        many_size=1024,
        many=10,
        memory_budget_gib=24.0,
        compile_backend="inductor",
        # default first: its compile is the one that fits a short run; the farm's own
        # setting (KOLORS_FARM_COMPILE_UNET) compiles with max-autotune.
        compile_modes=("default", "max-autotune"),
        parallel=1,
    ),
    "tiny": Profile(
        name="tiny",
        config_dir=model.CONFIGS["tiny"],
        size=128,
        steps=2,
        repeats=2,
        farm_size=512,
        farm_steps=2,
        farm_jobs=2,
        big_size=256,
        many_size=128,
        many=10,
        memory_budget_gib=24.0,  # applies only on a CUDA device
        # aot_eager traces the UNet like inductor does, without minutes of C++ compilation.
        compile_backend="aot_eager",
        compile_modes=("default",),
        parallel=3,
    ),
}


class Recorder:
    """Appends one JSON line per measurement to OUT/results.jsonl and prints a table row."""

    def __init__(self, out: Path) -> None:
        self.path = out / "results.jsonl"

    def write(self, row: dict[str, Any]) -> None:
        """Append `row` (with a timestamp) and flush it to disk before going on."""
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **row}
        line = (json.dumps(row, default=_json_default) + "\n").encode()
        # One write to a file opened for appending: lines from tasks that run side by side
        # never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        print(describe(row), flush=True)

    def rows(self) -> list[dict[str, Any]]:
        """Every row written so far."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _json_default(value: Any) -> Any:
    if isinstance(value, Path | torch.device | torch.dtype):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class Context:
    """What every task gets: the profile, the folders, the model source and the settings."""

    profile: Profile
    out: Path
    work: Path
    real_model: str | None  # a checkpoint (folder or hub id), or None for random weights
    recorder: Recorder
    settings: Settings = field(default_factory=Settings)

    @property
    def device(self) -> torch.device:
        """The device the farm's settings choose (KOLORS_FARM_DEVICE, default auto)."""
        return resolve_device(self.settings.device)

    def half(self, name: str) -> torch.dtype:
        """fp16 or bf16 as asked: the levels compare the same dtypes on every device."""
        return torch.float16 if name == "float16" else torch.bfloat16

    def pipeline(self, dtype: torch.dtype) -> tuple[Any, dict[str, float]]:
        """Random weights built on the device from the configs, or the real checkpoint."""
        if self.real_model:
            return model.load_pipeline(self.real_model, self.device, dtype)
        return model.build_pipeline(self.profile.config_dir, self.device, dtype, self.work)

    def base_row(self, stage: str, name: str, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """Fields every row carries."""
        device = self.device
        return {
            "stage": stage,
            "name": name,
            "profile": self.profile.name,
            "weights": self.real_model or f"random ({self.profile.config_dir.name})",
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        }


# --- timing -----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Times the denoising loop from step 1 to the last step: the it/s figure."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first: float | None = None
        self.last: float | None = None
        self.steps = 0

    def on_step(self, step: int, steps: int) -> None:
        """Called after step `step` of `steps`; synchronises at the first and last only."""
        if step == 1 or step == steps:
            synchronize(self.device)
            now = time.perf_counter()
            if step == 1:
                self.first = now
            if step == steps:
                self.last = now
        self.steps = steps

    @property
    def it_per_s(self) -> float | None:
        """Steps per second over steps 2..N (None for a single step)."""
        if self.first is None or self.last is None or self.steps < 2 or self.last <= self.first:
            return None
        return (self.steps - 1) / (self.last - self.first)


def image_is_finite(image: Image.Image) -> bool:
    """A NaN anywhere in the pipeline turns the decoded image into one flat colour."""
    pixels = np.asarray(image)
    return bool(pixels.std() > 0)


@contextlib.contextmanager
def nan_cast_is_error() -> Iterator[None]:
    """numpy warns when the pipeline casts NaN pixels to uint8; make that an exception."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="invalid value encountered in cast")
        yield


def reset_peak(device: torch.device) -> None:
    """Start counting peak memory from now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_fields(device: torch.device, prefix: str = "") -> dict[str, float | None]:
    """Peak allocated and reserved GiB since the last reset, and what is allocated now."""
    if device.type != "cuda":
        return {f"{prefix}peak_allocated_gib": None, f"{prefix}peak_reserved_gib": None}
    return {
        f"{prefix}peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
        f"{prefix}peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
    }


def measure(
    render: Callable[[StepClock], list[Image.Image]], device: torch.device, repeats: int
) -> dict[str, Any]:
    """One warm-up call, then `repeats` timed calls: medians, every sample, peak memory."""
    started = time.perf_counter()
    with nan_cast_is_error():
        images = render(StepClock(device))
    synchronize(device)
    first_call_s = time.perf_counter() - started
    finite = all(image_is_finite(image) for image in images)
    # Weights plus whatever stays allocated between calls (compiled graphs' memory pools).
    resident = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    reset_peak(device)
    seconds: list[float] = []
    rates: list[float] = []
    for _ in range(repeats):
        clock = StepClock(device)
        started = time.perf_counter()
        with nan_cast_is_error():
            images = render(clock)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        if clock.it_per_s is not None:
            rates.append(clock.it_per_s)
        finite = finite and all(image_is_finite(image) for image in images)
    median = statistics.median(seconds)
    return {
        "repeats": repeats,
        "s_per_image": round(median, 4),
        "s_per_image_samples": [round(s, 4) for s in seconds],
        "it_per_s": round(statistics.median(rates), 3) if rates else None,
        "first_call_s": round(first_call_s, 3),
        "resident_gib": round(resident, 3) if resident is not None else None,
        **memory_fields(device),
        "finite": finite,
    }


# --- the farm's own renderer ------------------------------------------------------------------


def apply_farm_options(pipe: Any, settings: Settings) -> None:
    """The options KolorsRenderer.load applies after loading, from the farm's settings.

    Mirrors worker/pipeline.py, which can only load from a checkpoint on disk.
    """
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.compile_unet:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=False)


def renderer_for(pipe: Any, ctx: Context, settings: Settings) -> KolorsRenderer:
    """The farm's renderer around an already-built pipeline."""
    renderer = KolorsRenderer(pipe, ctx.device, ctx.real_model or "random")
    renderer.vae_tiling_above_pixels = settings.vae_tiling_above_pixels
    return renderer


def params_for(width: int, height: int, steps: int) -> KolorsParams:
    """Request parameters; the rehearsal's sizes are below the API's 512 floor, so unchecked."""
    return KolorsParams.model_construct(
        prompt=PROMPT, negative_prompt=NEGATIVE, cfg=CFG, width=width, height=height, steps=steps
    )


def render_with(
    renderer: KolorsRenderer, params: KolorsParams, seeds: list[int]
) -> Callable[[StepClock], list[Image.Image]]:
    """A render function for `measure` that goes through KolorsRenderer.render."""

    def render(clock: StepClock) -> list[Image.Image]:
        images = renderer.render(params, seeds, clock.on_step, lambda: False)
        assert images is not None
        return images

    return render


# --- stage a: eager diffusers -----------------------------------------------------------------


def stage_a(ctx: Context) -> None:
    """Plain diffusers, fp16, batch 1: the baseline every speed-up is measured against."""
    profile, device = ctx.profile, ctx.device
    dtype = ctx.half("float16")
    pipe, build = ctx.pipeline(dtype)
    pipe.set_progress_bar_config(disable=True)

    def render(clock: StepClock) -> list[Image.Image]:
        def step_end(p: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            clock.on_step(step + 1, p.num_timesteps)
            return kwargs

        with torch.inference_mode():
            result = pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE,
                guidance_scale=CFG,
                num_inference_steps=profile.steps,
                width=profile.size,
                height=profile.size,
                generator=torch.Generator("cpu").manual_seed(0),
                callback_on_step_end=step_end,
            )
        images: list[Image.Image] = result.images
        return images

    ctx.recorder.write(
        {
            **ctx.base_row("a", "eager diffusers", dtype),
            "width": profile.size,
            "height": profile.size,
            "steps": profile.steps,
            "batch": 1,
            "build_s": round(build["build_s"], 2),
            **measure(render, device, profile.repeats),
        }
    )


# --- stage b: optimisation levels -------------------------------------------------------------

EAGER_LEVELS = (
    # name, dtype, SDPA, channels-last
    ("fp16, no SDPA", "float16", False, False),
    ("fp16 (diffusers default: SDPA)", "float16", True, False),
    ("bf16", "bfloat16", True, False),
    ("bf16 + channels-last", "bfloat16", True, True),
)


def _reference_s(ctx: Context) -> dict[str, float]:
    """Seconds per image of the eager fp16 runs already recorded (stage a, stage b's SDPA)."""
    found: dict[str, float] = {}
    for row in ctx.recorder.rows():
        if not row.get("ok", True) or row.get("s_per_image") is None:
            continue
        if row["stage"] == "a":
            found["a"] = row["s_per_image"]
        elif row["stage"] == "b" and row["name"] == EAGER_LEVELS[1][0]:
            found["b"] = row["s_per_image"]
    return found


def _speedups(ctx: Context, seconds: float, name: str) -> dict[str, float | None]:
    reference = _reference_s(ctx)
    if name == EAGER_LEVELS[1][0]:
        reference["b"] = seconds  # the reference level itself, not yet written
    return {
        "speedup_vs_eager_fp16": round(reference["a"] / seconds, 3) if "a" in reference else None,
        "speedup_vs_farm_fp16": round(reference["b"] / seconds, 3) if "b" in reference else None,
    }


def stage_b_eager(ctx: Context) -> None:
    """The eager levels side by side, one pipeline cast and switched between them."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    profile, device = ctx.profile, ctx.device
    pipe, build = ctx.pipeline(ctx.half(EAGER_LEVELS[0][1]))
    params = params_for(profile.size, profile.size, profile.steps)
    for name, dtype_name, sdpa, channels_last in EAGER_LEVELS:
        dtype = ctx.half(dtype_name)
        if pipe.dtype != dtype:
            pipe.to(dtype=dtype)
        processor = AttnProcessor2_0() if sdpa else AttnProcessor()  # type: ignore[no-untyped-call]
        pipe.unet.set_attn_processor(processor)
        pipe.vae.set_attn_processor(processor)
        settings = ctx.settings.model_copy(
            update={"channels_last": channels_last, "compile_unet": False}
        )
        apply_farm_options(pipe, settings)
        renderer = renderer_for(pipe, ctx, settings)
        try:
            result = measure(render_with(renderer, params, [0]), device, profile.repeats)
        except Exception as exc:
            ctx.recorder.write({**ctx.base_row("b", name, dtype), **error_fields(exc)})
            _free_cache(device)
            continue
        ctx.recorder.write(
            {
                **ctx.base_row("b", name, dtype),
                "options": {"sdpa": sdpa, "channels_last": channels_last, "compile": None},
                "width": profile.size,
                "height": profile.size,
                "steps": profile.steps,
                "build_s": round(build["build_s"], 2),
                **result,
                **_speedups(ctx, result["s_per_image"], name),
            }
        )


def stage_b_compile(ctx: Context, mode: str) -> None:
    """bf16 + SDPA + channels-last + torch.compile of the UNet; compile time on its own."""
    profile, device = ctx.profile, ctx.device
    dtype = ctx.half("bfloat16")
    pipe, build = ctx.pipeline(dtype)
    settings = ctx.settings.model_copy(update={"channels_last": True, "compile_unet": False})
    apply_farm_options(pipe, settings)
    backend = profile.compile_backend
    if backend == "inductor":
        # What KolorsRenderer.load does with KOLORS_FARM_COMPILE_UNET, in the mode asked for.
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=False)
    else:
        pipe.unet = torch.compile(pipe.unet, backend=backend, fullgraph=False)
    renderer = renderer_for(pipe, ctx, settings)
    params = params_for(profile.size, profile.size, profile.steps)
    result = measure(render_with(renderer, params, [0]), device, profile.repeats)
    name = f"bf16 + channels-last + compile ({mode})"
    ctx.recorder.write(
        {
            **ctx.base_row("b", name, dtype),
            "options": {"sdpa": True, "channels_last": True, "compile": mode},
            "compile_backend": backend,
            "farm_setting": mode == "max-autotune",
            "width": profile.size,
            "height": profile.size,
            "steps": profile.steps,
            "build_s": round(build["build_s"], 2),
            # The first call compiles and renders; a steady call only renders.
            "compile_s": round(max(0.0, result["first_call_s"] - result["s_per_image"]), 2),
            **result,
            **_speedups(ctx, result["s_per_image"], name),
        }
    )


# --- the saved checkpoint (stages c and e) ----------------------------------------------------


def checkpoint_dir(ctx: Context) -> Path:
    """Where the random checkpoint of this profile is saved."""
    return ctx.work / f"checkpoint-{ctx.profile.name}"


def farm_model(ctx: Context) -> str:
    """What KOLORS_FARM_MODEL is for the farm's processes: the real model or the saved one."""
    return ctx.real_model or str(checkpoint_dir(ctx))


def _config_stamp(ctx: Context) -> str:
    files = sorted(p for p in ctx.profile.config_dir.rglob("*.json"))
    return json.dumps({p.name + p.parent.name: p.read_text() for p in files}, sort_keys=True)


def save_checkpoint(ctx: Context) -> None:
    """Save the random pipeline once, in the layout and variant the farm loads."""
    folder = checkpoint_dir(ctx)
    stamp = folder / ".config-stamp"
    fresh = stamp.is_file() and stamp.read_text() == _config_stamp(ctx)
    if fresh and (folder / "model_index.json").is_file():
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        reused = {"reused": True, "path": folder, "bytes": size}
        ctx.recorder.write({**ctx.base_row("save", "random checkpoint"), **reused})
        return
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    device = ctx.device
    # fp16, the variant Kwai-Kolors/Kolors-diffusers ships and the farm loads in half
    # precision (cast to bf16 on load where that is the dtype).
    pipe, build = model.build_pipeline(ctx.profile.config_dir, device, torch.float16, ctx.work)
    started = time.perf_counter()
    size = model.save_checkpoint(pipe, folder)
    save_s = time.perf_counter() - started
    row: dict[str, Any] = {}
    if device.type == "cpu":
        # The farm loads fp32 on a CPU, which reads the plain files: save those too, and
        # check that the fp16 variant loads the way a GPU worker loads it.
        pipe.to(dtype=torch.float32)
        pipe.save_pretrained(folder, safe_serialization=True)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        loaded, _timings = model.load_pipeline(str(folder), device, torch.bfloat16)
        row["variant_loads_as"] = str(loaded.dtype).removeprefix("torch.")
    del pipe
    stamp.write_text(_config_stamp(ctx))
    ctx.recorder.write(
        {
            **ctx.base_row("save", "random checkpoint", torch.float16),
            "reused": False,
            "path": folder,
            "bytes": size,
            "variant": "fp16",
            "build_s": round(build["build_s"], 2),
            "save_s": round(save_s, 2),
            **row,
        }
    )


# --- processes --------------------------------------------------------------------------------


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment (PYTHONPATH included), without another farm's, plus `extra`."""
    env = dict(os.environ)
    # The bench's farm is its own: SQLite, local disk and a private Redis in its data dir.
    for name in ("REDIS_URL", "DATABASE_URL", "STORAGE_URL", "PUBLIC_BASE_URL"):
        env.pop(f"KOLORS_FARM_{name}", None)
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: the process and its session."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def log_tail(path: Path, limit: int = 4000) -> str:
    """The end of a log file, for error rows."""
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def keep_log(ctx: Context, path: Path, name: str, limit: int = 200_000) -> None:
    """Copy the end of a child's log next to the results (the device returns a few files)."""
    with contextlib.suppress(OSError):
        (ctx.out / name).write_text(path.read_text(errors="replace")[-limit:])


def http(
    method: str, url: str, body: dict[str, Any] | None = None, key: str | None = None,
    timeout: float = 600.0,
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One HTTP request with the standard library: status, headers, body."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("x-api-key", key)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def http_json(method: str, url: str, **kwargs: Any) -> Any:
    """An HTTP request whose answer must be 2xx JSON."""
    status, _headers, payload = http(method, url, **kwargs)
    if status >= 300:
        raise RuntimeError(f"{method} {url}: {status} {payload[:300]!r}")
    return json.loads(payload)


def wait_until(
    condition: Callable[[], Any], timeout_s: float, what: str, every: float = 0.1
) -> Any:
    """Poll `condition` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every)


# --- stage c: the farm end to end -------------------------------------------------------------


def _bare_loop(ctx: Context, dtype: torch.dtype, params: dict[str, Any], count: int) -> list[float]:
    """A plain diffusers loop with the farm's dtype and encoding: seconds per image."""
    from shared.jobs.imaging import encode_image

    device = ctx.device
    pipe, _build = ctx.pipeline(dtype)
    pipe.set_progress_bar_config(disable=True)
    seconds = []
    for i in range(count + 1):
        started = time.perf_counter()
        with torch.inference_mode():
            image = pipe(
                prompt=params["prompt"],
                negative_prompt=params["negative_prompt"],
                guidance_scale=params["cfg"],
                num_inference_steps=params["steps"],
                width=params["width"],
                height=params["height"],
                generator=torch.Generator("cpu").manual_seed(i),
            ).images[0]
        encode_image(image, params["output_format"], params["output_quality"])
        if i:  # the first call warms up, as the farm's warm-up job does
            seconds.append(time.perf_counter() - started)
    del pipe
    _free_cache(device)
    return seconds


def _free_cache(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sqlite_url(data_dir: Path) -> str:
    """The database `up` and a worker use in `data_dir` when no URL is configured."""
    return Settings(data_dir=data_dir, database_url=None).resolved_database_url


def _create_user(data_dir: Path) -> str:
    """A user with plenty of credits in the farm's database; its API key."""
    from shared.accounts.users import create_user
    from shared.db import make_engine, make_session_factory, transaction

    engine = make_engine(_sqlite_url(data_dir))
    try:
        with transaction(make_session_factory(engine)) as session:
            _user, key = create_user(session, "gpu-bench", "gpu-bench", 10_000_000)
    finally:
        engine.dispose()
    return key


def stage_c(ctx: Context) -> None:
    """`kolors-farm up` with one worker renders N jobs over HTTP, against a bare loop."""
    profile, device = ctx.profile, ctx.device
    jobs = profile.farm_jobs
    params = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "cfg": CFG,
        "width": profile.farm_size,
        "height": profile.farm_size,
        "steps": profile.farm_steps,
        "output_format": "webp",
        "output_quality": 80,
    }
    dtype = resolve_dtype(ctx.settings.dtype, device)
    data_dir = ctx.work / f"farm-{os.getpid()}"
    data_dir.mkdir(parents=True)
    log_path = data_dir / "farm.log"
    port = free_port()
    env = child_env(
        {
            "KOLORS_FARM_DATA_DIR": str(data_dir),
            "KOLORS_FARM_MODEL": farm_model(ctx),
            # Fresh heartbeats, so the busy fraction read at the end is at most a second old.
            "KOLORS_FARM_HEARTBEAT_INTERVAL_S": "1",
            # Every submission must render: the result cache would answer identical ones.
            "KOLORS_FARM_CACHE": "false",
        }
    )
    started = time.perf_counter()
    with log_path.open("wb") as log:
        farm = subprocess.Popen(
            [sys.executable, "-m", "control", "up", "--port", str(port), "--workers", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # The bare loop runs while the farm starts (its worker reads the checkpoint then),
        # which keeps the stage short; the farm renders nothing until it is ready.
        bare = _bare_loop(ctx, dtype, params, jobs)

        def ready() -> bool:
            if farm.poll() is not None:
                raise RuntimeError(f"the farm exited {farm.returncode}: {log_tail(log_path)}")
            try:
                body = http_json("GET", f"{url}/readyz", timeout=2)
            except (OSError, RuntimeError, ValueError):
                return False
            return bool(body.get("ready") and body.get("workers") and body.get("dispatcher"))

        wait_until(ready, 600, "the farm to become ready", every=0.25)
        startup_s = time.perf_counter() - started
        key = _create_user(data_dir)
        body = {k: params[k] for k in params if k != "output_quality"}
        status, _h, payload = http("POST", f"{url}/v1/kolors", body=body, key=key)  # warm-up
        if status != 200:
            raise RuntimeError(f"warm-up job: {status} {payload[:300]!r}")
        batch_started = time.perf_counter()
        ids = [
            http_json("POST", f"{url}/v2/kolors", body=body, key=key)["request_id"]
            for _ in range(jobs - 1)
        ]
        # One user's jobs run first in, first out: the synchronous route answers when the
        # last job is done, with no polling to steal the host's time.
        status, headers, payload = http("POST", f"{url}/v1/kolors", body=body, key=key)
        farm_s = time.perf_counter() - batch_started
        if status != 200:
            raise RuntimeError(f"last job: {status} {payload[:300]!r}")
        readyz = http_json("GET", f"{url}/readyz", timeout=10)
        ids.append(headers.get("x-request-id") or headers.get("X-Request-Id") or "")
        results = [http_json("GET", f"{url}/v2/requests/{i}", key=key) for i in ids if i]
    finally:
        stop_process(farm, grace_s=60)
        keep_log(ctx, log_path, "farm.log")
    states = sorted({r["status"] for r in results})
    # A job's claim to its settlement (render, encode, store, record), as the farm records it.
    job_s = [r.get("metrics", {}).get("render_seconds") or 0.0 for r in results]
    worker: dict[str, Any] = next(iter(readyz.get("workers", {}).values()), {})
    ctx.recorder.write(
        {
            **ctx.base_row("c", "farm end to end", dtype),
            "ok": states == ["COMPLETED"] and len(results) == jobs,
            "jobs": jobs,
            "width": profile.farm_size,
            "height": profile.farm_size,
            "steps": profile.farm_steps,
            "states": states,
            "farm_startup_s": round(startup_s, 2),
            "bare_s_per_image": round(statistics.mean(bare), 4),
            "bare_total_s": round(sum(bare), 3),
            "farm_total_s": round(farm_s, 3),
            "throughput_ratio": round(sum(bare) / farm_s, 3),
            "farm_job_s": round(sum(job_s), 3),
            "job_occupancy": round(sum(job_s) / farm_s, 3),
            # The worker's own measure (its heartbeat); null where the worker does not report it.
            "busy_fraction": worker.get("busy_fraction"),
            "busy_fraction_since_start": worker.get("busy_fraction_since_start"),
            "worker_device": worker.get("device_name") or worker.get("device"),
        }
    )


# --- stage d: memory --------------------------------------------------------------------------


def stage_d(ctx: Context) -> None:
    """A large image and ten images under a 24 GiB cap, chunked by the farm's memory model."""
    profile, device = ctx.profile, ctx.device
    settings = ctx.settings
    budget = None
    if device.type == "cuda" and profile.memory_budget_gib is not None:
        budget = int(profile.memory_budget_gib * GIB)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe, _build = ctx.pipeline(dtype)
    renderer = renderer_for(pipe, ctx, settings)
    memory = MemoryModel(
        bytes_per_megapixel=settings.memory_per_megapixel_mb * MIB,
        reserve_bytes=settings.memory_reserve_mb * MIB,
    )
    # The highest KOLORS_FARM_RENDER_BATCH_SIZE, so the memory model alone sizes the calls.
    max_batch = 10
    cases = [
        (f"1 image {profile.big_size}x{profile.big_size}", profile.big_size, 1),
        (f"{profile.many} images {profile.many_size}x{profile.many_size}", profile.many_size,
         profile.many),
    ]  # fmt: skip
    for name, size, count in cases:
        params = params_for(size, size, profile.steps)
        row: dict[str, Any] = {
            **ctx.base_row("d", name, dtype),
            "width": size,
            "height": size,
            "steps": profile.steps,
            "images": count,
            "memory_budget_gib": profile.memory_budget_gib if budget else None,
            "model_mb_per_megapixel": settings.memory_per_megapixel_mb,
            "model_reserve_mb": settings.memory_reserve_mb,
            "vae_tiling": bool(settings.vae_tiling_above_pixels)
            and size * size > settings.vae_tiling_above_pixels,
        }
        if budget is not None:
            # What a card with `budget` bytes would report free: mem_get_info ignores the cap.
            free = budget - torch.cuda.memory_reserved(device)
            per_call = images_per_call(memory, size, size, free, max_batch)
        else:
            per_call = renderer.images_per_call(params, max_batch, memory)
        chunks = plan_chunks(list(range(count)), per_call)
        calls: list[dict[str, Any]] = []
        started = time.perf_counter()
        try:
            for chunk in chunks:
                before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                reset_peak(device)
                with nan_cast_is_error():
                    images = renderer.render(params, chunk, lambda _s, _n: None, lambda: False)
                assert images is not None and len(images) == len(chunk)
                call: dict[str, Any] = {
                    "images": len(chunk),
                    "finite": all(image_is_finite(image) for image in images),
                }
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device)
                    megapixels = len(chunk) * size * size / 1e6
                    call |= {
                        "peak_allocated_gib": round(peak / GIB, 3),
                        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
                        "allocated_before_gib": round(before / GIB, 3),
                        "mb_per_megapixel": round((peak - before) / MIB / megapixels, 1),
                    }
                calls.append(call)
            row |= {"ok": True, "oom": False}
        except torch.OutOfMemoryError as exc:
            row |= {"ok": False, "oom": True, "error": str(exc).splitlines()[0][:300]}
        row |= {
            "per_call": per_call,
            "calls": calls,
            "seconds": round(time.perf_counter() - started, 2),
            "finite": all(c["finite"] for c in calls) if calls else None,
        }
        if device.type == "cuda" and calls and row["ok"]:
            worst = max(c["mb_per_megapixel"] for c in calls)
            row |= {
                "measured_mb_per_megapixel": worst,
                "peak_reserved_gib": max(c["peak_reserved_gib"] for c in calls),
                "model_holds": worst <= settings.memory_per_megapixel_mb,
            }
        else:
            row |= {
                "measured_mb_per_megapixel": None,
                "model_holds": False if row.get("oom") else None,
            }
        ctx.recorder.write(row)
        _free_cache(device)


# --- stage e: cold start ----------------------------------------------------------------------

_BARE_LOAD = """
import json, sys, time
from pathlib import Path
import torch
from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline
imported = time.time()
source, device, dtype = sys.argv[1], torch.device(sys.argv[2]), getattr(torch, sys.argv[3])
kwargs = {"dtype": dtype, "use_safetensors": True}
folder = Path(source)
if dtype in (torch.float16, torch.bfloat16) and (
    not folder.is_dir() or any(folder.rglob("*.fp16.safetensors"))
):
    kwargs["variant"] = "fp16"
pipe = KolorsPipeline.from_pretrained(source, **kwargs)
read = time.time()
pipe.to(device)
if device.type == "cuda":
    torch.cuda.synchronize(device)
print("BARE " + json.dumps({"imported": imported, "read": read, "loaded": time.time()}), flush=True)
"""


def _bare_result(proc: subprocess.Popen[bytes], log: Path) -> dict[str, float]:
    """Wait for the bare load and read the times it printed."""
    code = proc.wait(timeout=600)
    text = log.read_text(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("BARE ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"bare load failed ({code}): {text[-3000:]}")
    times: dict[str, float] = json.loads(line[5:])
    return times


def stage_e(ctx: Context) -> None:
    """Worker process start to ready, against a bare from_pretrained(...).to(device)."""
    from shared.migrate import migrate_database
    from shared.redis_client import make_redis
    from shared.scheduling.fleet import live_workers

    device = ctx.device
    dtype = resolve_dtype(ctx.settings.dtype, device)
    source = farm_model(ctx)
    data_dir = ctx.work / f"cold-{os.getpid()}"
    data_dir.mkdir(parents=True)
    scratch = start_scratch_redis(data_dir / "redis")
    redis_proc, redis_url = scratch.process, scratch.url
    worker_log = data_dir / "worker.log"
    bare_proc: subprocess.Popen[bytes] | None = None
    try:
        migrate_database(_sqlite_url(data_dir))
        # The same files, read the same way, in a fresh process.
        bare_log = data_dir / "bare.log"
        with bare_log.open("wb") as log:
            spawned = time.time()
            bare_proc = subprocess.Popen(
                [sys.executable, "-c", _BARE_LOAD, source, str(device), str(dtype).split(".")[-1]],
                env=child_env({}),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # On a GPU the bare load runs first, alone: two loads at once would share the disk,
        # the host and the GPU. On a CPU (the rehearsal, whose times mean nothing) the
        # worker starts beside it, which halves the stage's time.
        if device.type != "cpu":
            bare = _bare_result(bare_proc, bare_log)
        name = "cold-bench"
        env = child_env(
            {
                "KOLORS_FARM_DATA_DIR": str(data_dir),
                "KOLORS_FARM_MODEL": source,
                "KOLORS_FARM_REDIS_URL": redis_url,
                "KOLORS_FARM_HEARTBEAT_INTERVAL_S": "1",
                "KOLORS_FARM_CACHE": "false",
            }
        )
        client = make_redis(redis_url)
        with worker_log.open("wb") as log:
            spawned_worker = time.time()
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker", "worker", "--device", str(device),
                 "--name", name],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:

            def heartbeat() -> float | None:
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited: {log_tail(worker_log)}")
                return time.time() if name in live_workers(client) else None

            heartbeat_at = wait_until(heartbeat, 600, "the worker's first heartbeat", every=0.02)

            def consuming() -> float | None:
                text = log_tail(worker_log, 20_000)
                return time.time() if re.search(r"\bready\.", text) else None

            try:
                ready_at = wait_until(consuming, 60, "celery's ready line", every=0.02)
            except TimeoutError:
                ready_at = None
        finally:
            # Nothing to finish: its Redis and database are thrown away, so no clean stop.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
            keep_log(ctx, worker_log, "cold-worker.log")
        if device.type == "cpu":
            bare = _bare_result(bare_proc, bare_log)
    finally:
        if bare_proc is not None:
            stop_process(bare_proc, grace_s=5)
        stop_process(redis_proc, grace_s=10)
    log_text = log_tail(worker_log, 200_000)
    loaded = re.search(r"read in ([\d.]+) s, on the device in ([\d.]+) s", log_text)
    warmed = re.search(r"warmed up in ([\d.]+) s", log_text)
    bare_s = bare["loaded"] - spawned
    worker_s = (ready_at or heartbeat_at) - spawned_worker
    ctx.recorder.write(
        {
            **ctx.base_row("e", "cold start", dtype),
            "checkpoint": source,
            "bare_load_s": round(bare_s, 2),
            "bare_import_s": round(bare["imported"] - spawned, 2),
            "bare_read_s": round(bare["read"] - bare["imported"], 2),
            "bare_to_device_s": round(bare["loaded"] - bare["read"], 2),
            "worker_heartbeat_s": round(heartbeat_at - spawned_worker, 2),
            "worker_ready_s": round(worker_s, 2),
            "worker_ready_from": "celery ready line" if ready_at else "first heartbeat",
            "worker_log_read_s": float(loaded.group(1)) if loaded else None,
            "worker_log_loaded_s": float(loaded.group(2)) if loaded else None,
            "worker_warmup_s": float(warmed.group(1)) if warmed else None,
            "ratio": round(worker_s / bare_s, 3),
            # Against the load call alone, imports left out.
            "ratio_vs_load_only": round(worker_s / (bare["loaded"] - bare["imported"]), 3),
            "ran_beside_bare": device.type == "cpu",
        }
    )


# --- rows -------------------------------------------------------------------------------------


def error_fields(exc: BaseException) -> dict[str, Any]:
    """An error as row fields."""
    text = f"{type(exc).__name__}: {exc}"
    return {"ok": False, "error": text[:2000]}


def _fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def describe(row: dict[str, Any]) -> str:
    """One table row for a result line."""
    stage, name = row.get("stage", "?"), row.get("name", "")
    head = f"[{stage}] {name:<40}"
    if row.get("ok") is False and "error" in row:
        return f"{head} FAILED: {row['error'][:300]}"
    if stage in ("a", "b"):
        extra = ""
        if row.get("compile_s") is not None:
            extra += f"  compile {_fmt(row['compile_s'], ' s', 1)}"
        if row.get("speedup_vs_eager_fp16") is not None:
            extra += f"  x{row['speedup_vs_eager_fp16']:.2f} vs eager fp16"
        return (
            f"{head} {_fmt(row.get('s_per_image'), ' s/image')}  "
            f"{_fmt(row.get('it_per_s'), ' it/s', 2)}  "
            f"peak {_fmt(row.get('peak_allocated_gib'), ' GiB', 2)}{extra}"
        )
    if stage == "c":
        return (
            f"{head} {row.get('jobs')} jobs: farm {_fmt(row.get('farm_total_s'), ' s', 2)} vs "
            f"bare {_fmt(row.get('bare_total_s'), ' s', 2)} = x{_fmt(row.get('throughput_ratio'))}"
            f"  busy {_fmt(row.get('busy_fraction'))}  occupancy "
            f"{_fmt(row.get('job_occupancy'))}"
        )
    if stage == "d":
        state = "OOM" if row.get("oom") else "ok"
        return (
            f"{head} {state}  calls of {row.get('per_call')}  peak "
            f"{_fmt(row.get('peak_reserved_gib'), ' GiB', 2)}  "
            f"{_fmt(row.get('measured_mb_per_megapixel'), ' MB/MP', 0)} vs model "
            f"{row.get('model_mb_per_megapixel')}  holds: {row.get('model_holds')}"
        )
    if stage == "e":
        return (
            f"{head} worker {_fmt(row.get('worker_ready_s'), ' s', 2)} vs bare "
            f"{_fmt(row.get('bare_load_s'), ' s', 2)} = x{_fmt(row.get('ratio'))}"
        )
    if stage == "save":
        size = row.get("bytes")
        gb = f"{size / 1e9:.2f} GB" if isinstance(size, int) else "-"
        reused = " (reused)" if row.get("reused") else f" in {_fmt(row.get('save_s'), ' s', 1)}"
        return f"{head} {gb}{reused}"
    keys = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("time", "stage", "name"))
    return f"{head} {keys[:300]}"
