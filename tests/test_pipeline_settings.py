"""The rendering options reach the real pipeline (tiny checkpoint, CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.jobs.params import KolorsParams
from shared.settings import Settings
from worker.memory import MIB, MemoryModel
from worker.pipeline import KolorsRenderer


def load(tiny_model_dir: Path, **options: object) -> KolorsRenderer:
    settings = Settings(model=str(tiny_model_dir)).model_copy(update=options)
    return KolorsRenderer.load(settings, "cpu")


def test_channels_last_reaches_the_unet_and_vae(tiny_model_dir: Path) -> None:
    plain = load(tiny_model_dir)
    fast = load(tiny_model_dir, channels_last=True)
    weight = fast.pipe.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_wraps_the_unet(tiny_model_dir: Path) -> None:
    renderer = load(tiny_model_dir, compile_unet=True)
    assert isinstance(renderer.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)


def test_vae_tiling_is_used_only_above_the_threshold(tiny_model_dir: Path) -> None:
    renderer = load(tiny_model_dir, vae_tiling_above_pixels=600 * 600)
    noop = (lambda _s, _n: None, lambda: False)
    renderer.render(KolorsParams(prompt="x", width=768, height=768, steps=1), [0], *noop)
    assert renderer.pipe.vae.use_tiling
    renderer.render(KolorsParams(prompt="x", width=512, height=512, steps=1), [0], *noop)
    assert not renderer.pipe.vae.use_tiling


def test_warm_up_and_device_status(tiny_model_dir: Path) -> None:
    renderer = load(tiny_model_dir)
    assert not renderer.warm
    assert renderer.warm_up() > 0 and renderer.warm
    status = renderer.device_status()
    assert status["device_name"] == "cpu"
    assert 0 < status["memory_free_bytes"] <= status["memory_total_bytes"]


def test_cpu_renders_the_configured_batch(tiny_model_dir: Path) -> None:
    renderer = load(tiny_model_dir)
    params = KolorsParams(prompt="x", width=2048, height=2048, number_of_images=10)
    model = MemoryModel(bytes_per_megapixel=1600 * MIB, reserve_bytes=0)
    assert renderer.images_per_call(params, 4, model) == 4
