"""Random-weight Kolors built from committed config files, directly on the device.

`kolors-config/` holds the published configuration of Kolors' text encoder
(ChatGLM3-6B), UNet, VAE (SDXL's) and scheduler; `tiny-config/` the same files at
the tiny checkpoint's sizes (worker/tiny.py) for the CPU rehearsal. The same code
builds either. Weights are created on the target device in the target dtype
(the default dtype is switched while the modules are constructed, as
transformers' from_pretrained does), so the 8.9 B parameters of the full model
take seconds on a GPU and never pass through host memory in fp32.

Random weights cost exactly what real ones cost to run; `KOLORS_FARM_MODEL`
(see bench.py) swaps in a real checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel, RMSNorm
from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler

HERE = Path(__file__).resolve().parent
CONFIGS = {"full": HERE / "kolors-config", "tiny": HERE / "tiny-config"}
SEED = 20240706


def read_config(config_dir: Path, component: str) -> dict[str, Any]:
    """One component's config file as a dict (`scheduler` reads scheduler_config.json)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    config: dict[str, Any] = json.loads((config_dir / component / name).read_text())
    return config


@contextlib.contextmanager
def _constructing(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Create every tensor on `device` in `dtype` while the block runs."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _text_encoder_config(config_dir: Path) -> ChatGLMConfig:
    values = read_config(config_dir, "text_encoder")
    values.setdefault("original_rope", True)  # ChatGLMModel reads it; the config class lacks it
    return ChatGLMConfig(**values)  # type: ignore[no-untyped-call]


def make_text_encoder(config_dir: Path, device: torch.device | str, dtype: torch.dtype) -> Any:
    """ChatGLM3 on `device`; its weights are uninitialised until `init_text_encoder`."""
    config = _text_encoder_config(config_dir)
    with _constructing(device, dtype):
        # ChatGLMModel builds its layers with skip_init, which puts them on the CPU unless
        # told otherwise, whatever the default device.
        return ChatGLMModel(config, device=device)


def make_unet(config_dir: Path, device: torch.device | str, dtype: torch.dtype) -> Any:
    """The UNet with PyTorch's default initialisation, on `device`."""
    with _constructing(device, dtype):
        return UNet2DConditionModel.from_config(read_config(config_dir, "unet"))


def make_vae(config_dir: Path, device: torch.device | str, dtype: torch.dtype) -> Any:
    """The VAE with PyTorch's default initialisation, on `device`."""
    with _constructing(device, dtype):
        return AutoencoderKL.from_config(read_config(config_dir, "vae"))


@torch.no_grad()
def init_text_encoder(model: torch.nn.Module) -> None:
    """Give every text-encoder tensor a value: ChatGLMModel allocates them uninitialised.

    Linear N(0, 0.02) with zero bias, embeddings N(0, 1) (with 0.02 the prompt barely
    matters), RMSNorm weights 1 (RMSNorm uses torch.empty even outside skip_init).
    """
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(mean=0.0, std=0.02)
            done.add(id(module.weight))
            if module.bias is not None:
                module.bias.zero_()
                done.add(id(module.bias))
        elif isinstance(module, torch.nn.Embedding):
            module.weight.normal_(mean=0.0, std=1.0)
            done.add(id(module.weight))
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
            done.add(id(module.weight))
    missed = [name for name, param in model.named_parameters() if id(param) not in done]
    if missed:
        raise RuntimeError(f"text encoder: no initialiser for {missed[:5]}")


@torch.no_grad()
def check_finite(model: torch.nn.Module, what: str) -> None:
    """Raise if any floating-point parameter or buffer holds NaN or infinity."""
    bad = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise RuntimeError(f"{what}: not finite: {bad[:5]}")


def count_parameters(config_dir: Path) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no time)."""
    return {
        "text_encoder": _numel(make_text_encoder(config_dir, "meta", torch.float16)),
        "unet": _numel(make_unet(config_dir, "meta", torch.float16)),
        "vae": _numel(make_vae(config_dir, "meta", torch.float16)),
    }


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_tokenizer(work_dir: Path) -> Any:
    """Kolors' tokenizer class with the tiny checkpoint's SentencePiece model (built offline).

    The prompt is always padded to 256 tokens, so the vocabulary does not change the cost.
    """
    from worker.tiny import ensure_tiny_checkpoint

    tiny = ensure_tiny_checkpoint(work_dir / "tiny-tokenizer-source")
    return ChatGLMTokenizer.from_pretrained(str(tiny / "tokenizer"))


def build_pipeline(
    config_dir: Path, device: torch.device, dtype: torch.dtype, work_dir: Path
) -> tuple[KolorsPipeline, dict[str, float]]:
    """A random-weight KolorsPipeline on `device` in `dtype`, and seconds per build step."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    tokenizer = load_tokenizer(work_dir)
    timings["tokenizer_s"] = time.perf_counter() - started
    # Fixed seeds: every build of a configuration has the same weights on a device type.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(SEED)
        mark = time.perf_counter()
        text_encoder = make_text_encoder(config_dir, device, dtype)
        init_text_encoder(text_encoder)
        torch.manual_seed(SEED + 1)
        unet = make_unet(config_dir, device, dtype)
        torch.manual_seed(SEED + 2)
        vae = make_vae(config_dir, device, dtype)
        _synchronize(device)
        timings["weights_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    for model, what in ((text_encoder, "text encoder"), (unet, "unet"), (vae, "vae")):
        check_finite(model, what)
    timings["finite_check_s"] = time.perf_counter() - mark
    scheduler = EulerDiscreteScheduler.from_config(read_config(config_dir, "scheduler"))
    pipe = KolorsPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        image_encoder=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        force_zeros_for_empty_prompt=False,
    )
    timings["build_s"] = time.perf_counter() - started
    return pipe, timings


def has_fp16_variant(source: str) -> bool:
    """Whether a checkpoint folder ships `*.fp16.safetensors` (assumed for a hub id)."""
    return any(Path(source).rglob("*.fp16.safetensors")) if Path(source).is_dir() else True


def load_pipeline(
    source: str, device: torch.device, dtype: torch.dtype
) -> tuple[KolorsPipeline, dict[str, float]]:
    """A real checkpoint, loaded the way the farm loads it, then moved to `device`."""
    started = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    if dtype in (torch.float16, torch.bfloat16) and has_fp16_variant(source):
        kwargs["variant"] = "fp16"
    pipe = KolorsPipeline.from_pretrained(source, **kwargs)
    read_s = time.perf_counter() - started
    pipe.to(device)
    _synchronize(device)
    return pipe, {"read_s": read_s, "build_s": time.perf_counter() - started}


def save_checkpoint(pipe: KolorsPipeline, folder: Path) -> int:
    """Save in the diffusers layout as the fp16 variant (what the farm loads); bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True, variant="fp16")
    # safetensors writes 0600 files; the farm's processes may run as another user.
    for path in folder.rglob("*"):
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    # Parameter counts of both configurations, on the meta device: a check of the configs.
    for profile, folder in CONFIGS.items():
        counts = count_parameters(folder)
        shown = {k: f"{v / 1e9:.3f} B" for k, v in counts.items()}
        print(profile, shown, f"total {sum(counts.values()) / 1e9:.3f} B")
