"""Chunking a job's images to the device's free memory never exceeds the budget."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.memory import MIB, MemoryModel, images_per_call, plan_chunks

SIZES = st.integers(min_value=64, max_value=256).map(lambda n: n * 8)  # 512 to 2048
MODEL = MemoryModel(bytes_per_megapixel=1600 * MIB, reserve_bytes=2048 * MIB)


@given(
    width=SIZES,
    height=SIZES,
    free_gib=st.floats(min_value=0, max_value=200),
    max_batch=st.integers(min_value=1, max_value=10),
)
def test_a_call_fits_the_budget_whenever_more_than_one_image_is_rendered(
    width: int, height: int, free_gib: float, max_batch: int
) -> None:
    free = int(free_gib * 1024 * MIB)
    per_call = images_per_call(MODEL, width, height, free, max_batch)
    assert 1 <= per_call <= max_batch
    if per_call > 1:
        assert per_call * MODEL.image_bytes(width, height) <= free - MODEL.reserve_bytes
    # One more image would not have fitted (unless the batch cap stopped it).
    if per_call < max_batch:
        assert (per_call + 1) * MODEL.image_bytes(width, height) > free - MODEL.reserve_bytes


@given(
    count=st.integers(min_value=1, max_value=10), per_call=st.integers(min_value=1, max_value=10)
)
def test_chunks_cover_every_image_once_in_order(count: int, per_call: int) -> None:
    indices = list(range(count))
    chunks = plan_chunks(indices, per_call)
    assert [i for chunk in chunks for i in chunk] == indices
    assert all(1 <= len(chunk) <= per_call for chunk in chunks)


def test_known_figures() -> None:
    # 24 GiB free: 1024x1024 images at 1.6 GiB each after 2 GiB reserve -> 13, capped at 10.
    assert images_per_call(MODEL, 1024, 1024, 24 * 1024 * MIB, 10) == 10
    # 2048x2048 is four times the pixels: 6.7 GiB each -> 3 fit in 22 GiB.
    assert images_per_call(MODEL, 2048, 2048, 24 * 1024 * MIB, 10) == 3
    # Nothing fits: still one at a time (VAE tiling and the OOM handler are the backstop).
    assert images_per_call(MODEL, 2048, 2048, 4 * 1024 * MIB, 10) == 1
