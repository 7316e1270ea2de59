"""Load the Kolors pipeline once and render with it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline
from PIL import Image

from shared.jobs.cache import render_fingerprint
from shared.jobs.params import SCHEDULERS, KolorsParams
from shared.settings import Settings
from worker.memory import MemoryModel, images_per_call
from worker.tiny import ensure_tiny_checkpoint

log = logging.getLogger(__name__)

TINY_MODEL = "tiny"
StepCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]


def resolve_device(requested: str) -> torch.device:
    """`auto` picks the first CUDA device when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
    return device


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it, else fp16 on GPUs, fp32 on the CPU."""
    if requested != "auto":
        dtype: torch.dtype = getattr(torch, requested)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_model_source(settings: Settings) -> str:
    """A folder or hub id to load; `tiny` builds the tiny checkpoint once under the data dir."""
    if settings.model == TINY_MODEL:
        return str(ensure_tiny_checkpoint(settings.tiny_model_dir))
    return settings.model


_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_index_sha256(folder: Path) -> str:
    """A fingerprint of a checkpoint's weights, from its index files and weight files' sizes.

    Hashing gigabytes of weights at every worker start would cost minutes.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".json" and (path.name == "model_index.json" or "index" in path.name):
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        elif path.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()


def weight_files_identity(folder: Path) -> str:
    """What tells two copies of a checkpoint's weight files apart, without reading them.

    A hub snapshot's files link to blobs named by their SHA-256: an exact identity at no
    cost. A plain folder's files are told apart by size and modification time (whole
    seconds: copies that keep times, as `rsync -a` and image layers do, agree across hosts),
    so weights replaced in place under the same names and sizes are a new identity.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in _WEIGHT_SUFFIXES):
        if not path.is_file():
            continue
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            identity = Path(os.readlink(path)).name
        else:
            stat = path.stat()
            identity = f"{stat.st_size}:{int(stat.st_mtime)}"
        digest.update(f"{name}\0{identity}\0".encode())
    return digest.hexdigest()


def _has_fp16_variant(source: str) -> bool:
    """Whether the checkpoint ships half-precision weight files (`*.fp16.safetensors`)."""
    if Path(source).is_dir():
        return any(Path(source).rglob("*.fp16.safetensors"))
    return True  # the hub's Kwai-Kolors/Kolors-diffusers does; from_pretrained checks


def _checkpoint_folder(source: str) -> Path | None:
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        return None


def library_versions() -> dict[str, str]:
    """The versions that decide what a seed renders to."""
    import transformers

    return {
        "kolors-farm": importlib.metadata.version("kolors-farm"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


class KolorsRenderer:
    """One loaded pipeline on one device; renders one job's images at a time."""

    def __init__(
        self,
        pipe: KolorsPipeline,
        device: torch.device,
        model_id: str,
        weights_sha256: str | None = None,
    ) -> None:
        self.pipe = pipe
        self.device = device
        self.model_id = model_id
        self.weights_sha256 = weights_sha256
        self.versions = library_versions()
        self.warm = False
        self.vae_tiling_above_pixels = 0  # 0: never tile
        # Settings that change the numerics, hence the pixels (see render_fingerprint).
        self.numeric_options: dict[str, Any] = {}
        self.weight_files: str | None = None  # see weight_files_identity
        self._scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}
        pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]

    @classmethod
    def load(cls, settings: Settings, device_name: str) -> KolorsRenderer:
        """Load the configured model onto the device; any failure propagates (and is fatal)."""
        device = resolve_device(device_name)
        dtype = resolve_dtype(settings.dtype, device)
        source = resolve_model_source(settings)
        started = time.perf_counter()
        kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
        if dtype in (torch.float16, torch.bfloat16) and _has_fp16_variant(source):
            kwargs["variant"] = "fp16"  # half the bytes to read; cast on load where bf16
        pipe = KolorsPipeline.from_pretrained(source, **kwargs)
        loaded_s = time.perf_counter() - started
        if settings.text_encoder_offload:
            # ChatGLM3-6B is 12 GB in half precision; offloading keeps it on the host and
            # moves each model to the GPU only while it runs.
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        if settings.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if settings.compile_unet:
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=False)
        log.info(
            "loaded %s on %s as %s: read in %.1f s, on the device in %.1f s",
            settings.model,
            device,
            dtype,
            loaded_s,
            time.perf_counter() - started,
        )
        folder = _checkpoint_folder(source)
        fingerprint = weights_index_sha256(folder) if folder is not None else None
        renderer = cls(pipe, device, settings.model, fingerprint)
        renderer.vae_tiling_above_pixels = settings.vae_tiling_above_pixels
        renderer.weight_files = weight_files_identity(folder) if folder is not None else None
        renderer.numeric_options = {
            "channels_last": settings.channels_last,
            "compile_unet": settings.compile_unet,
            # Batched kernels round a level apart from single-image ones.
            "render_batch_size": settings.render_batch_size,
        }
        return renderer

    @property
    def render_fingerprint(self) -> str | None:
        """What decides this worker's pixels beside the request (the result cache's key part).

        None when the weights could not be fingerprinted: its images are not cached.
        """
        if self.weights_sha256 is None:
            return None
        return render_fingerprint(
            self.weights_sha256,
            self.versions,
            device_type=self.device.type,
            dtype=str(self.pipe.dtype).removeprefix("torch."),
            options=self.numeric_options
            | {
                "vae_tiling_above_pixels": self.vae_tiling_above_pixels,
                # Same names and sizes (the generation record's fingerprint) are not the
                # same weights: a fine-tune of one shape swapped in place must not hit.
                "weight_files": self.weight_files,
            },
        )

    def warm_up(self) -> float:
        """Render one small throwaway image so no user pays for first-call costs; seconds."""
        started = time.perf_counter()
        params = KolorsParams(prompt="warm-up", width=512, height=512, steps=2)
        self.render(params, [0], lambda _step, _steps: None, lambda: False)
        return time.perf_counter() - started

    def device_status(self) -> dict[str, Any]:
        """The device's name and memory, for the workers' status."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            name = torch.cuda.get_device_name(self.device)
        else:
            page = os.sysconf("SC_PAGE_SIZE")
            total = os.sysconf("SC_PHYS_PAGES") * page
            free = os.sysconf("SC_AVPHYS_PAGES") * page
            name = "cpu"
        return {"device_name": name, "memory_total_bytes": total, "memory_free_bytes": free}

    def images_per_call(self, params: KolorsParams, max_batch: int, model: MemoryModel) -> int:
        """How many of a job's images one call renders: what fits the device's free memory."""
        if self.device.type != "cuda":
            return max_batch
        free, _total = torch.cuda.mem_get_info(self.device)
        return images_per_call(model, params.width, params.height, free, max_batch)

    def generation_record(self, params: KolorsParams, seed: int) -> dict[str, Any]:
        """What reproduces one image: its parameters (resubmittable as is), model and versions."""
        return {
            "parameters": {
                "prompt": params.prompt,
                "negative_prompt": params.negative_prompt,
                "cfg": params.cfg,
                "seed": seed,
                "steps": params.steps,
                "width": params.width,
                "height": params.height,
                "scheduler": params.scheduler,
                "output_format": params.output_format,
                "output_quality": params.output_quality,
            },
            "model": self.model_id,
            "weights_sha256": self.weights_sha256,
            "device": self.device.type,
            "dtype": str(self.pipe.dtype).removeprefix("torch."),
            "versions": self.versions,
        }

    def scheduler(self, name: str) -> Any:
        """The named scheduler, built once from the model's own scheduler config."""
        if name not in SCHEDULERS:
            raise ValueError(f"unsupported scheduler {name!r}")
        if name not in self._schedulers:
            self._schedulers[name] = getattr(diffusers, name).from_config(self._scheduler_config)
        return self._schedulers[name]

    def render(
        self, params: KolorsParams, seeds: list[int], on_step: StepCallback, should_stop: StopCheck
    ) -> list[Image.Image] | None:
        """Render one image per seed; None if `should_stop` interrupted the loop."""
        self.pipe.scheduler = self.scheduler(params.scheduler)
        # Large decodes run tile by tile: the VAE's full-resolution activations are the peak.
        limit = self.vae_tiling_above_pixels
        if limit and params.width * params.height > limit:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()
        # CPU generators give the same starting noise on every device type.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        interrupted = False

        def step_end(
            pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal interrupted
            on_step(step + 1, pipe.num_timesteps)
            if should_stop():
                interrupted = True
                pipe._interrupt = True  # diffusers' documented way to stop the loop
            return kwargs

        with torch.inference_mode():
            result = self.pipe(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                guidance_scale=params.cfg,
                num_inference_steps=params.steps,
                width=params.width,
                height=params.height,
                num_images_per_prompt=len(seeds),
                generator=generators,
                callback_on_step_end=step_end,
                output_type="pil",
            )
        if interrupted:
            return None  # the VAE decoded partial latents; they are not a result
        images: list[Image.Image] = result.images
        self.warm = True
        return images
