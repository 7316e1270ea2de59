"""How many images one pipeline call may render without running out of device memory.

A request of up to ten 2048x2048 images must never crash a worker, so a job's
images are rendered in chunks sized to the memory the device has free. The
estimate is linear in pixels (the UNet's activations with classifier-free
guidance and the VAE decode both are, with SDPA attention and a tiled VAE);
its slope is a setting, and a CUDA out-of-memory error that slips through still
fails only its job.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryModel:
    """Bytes one image needs while rendering, per megapixel, and bytes always kept free."""

    bytes_per_megapixel: int
    reserve_bytes: int

    def image_bytes(self, width: int, height: int) -> int:
        """Estimated peak bytes of one image of this size."""
        return int(self.bytes_per_megapixel * width * height / 1_000_000)


def images_per_call(
    model: MemoryModel, width: int, height: int, free_bytes: int, max_batch: int
) -> int:
    """The most images one call may render within `free_bytes`; at least 1, at most max_batch."""
    budget = free_bytes - model.reserve_bytes
    fits = budget // max(1, model.image_bytes(width, height))
    return int(max(1, min(max_batch, fits)))


def plan_chunks(indices: list[int], per_call: int) -> list[list[int]]:
    """Split image indices, in order, into calls of at most `per_call` images."""
    if per_call < 1:
        raise ValueError("per_call must be at least 1")
    return [indices[start : start + per_call] for start in range(0, len(indices), per_call)]
