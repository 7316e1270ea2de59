"""Several images per pipeline call: image i still uses seed + i and matches its render alone.

In-process through `KolorsRenderer.render` (several seeds in one call, which is what
`KOLORS_FARM_RENDER_BATCH_SIZE` > 1 makes the worker do), then through a real worker
process with `KOLORS_FARM_RENDER_BATCH_SIZE=3`, comparing stored PNGs over HTTP.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image

from shared.jobs.params import KolorsParams
from tests.farms import FarmFactory, RunningFarm
from tests.processes import wait_for
from worker.pipeline import KolorsRenderer

SEED = 4242
Pixels = npt.NDArray[np.int16]

# Batched and single-image calls run the UNet and VAE on different batch sizes, and CPU
# kernels block their float sums differently for each, so a decoded value that lies within
# about 1e-6 of a rounding boundary can land one level (of 255) apart. Measured on the tiny
# checkpoint (Euler, Euler ancestral, DPM-Solver; 4 and 8 steps): max difference 1, on under
# 0.01 % of the values. A float error big enough to move a value by 2 levels (about 0.4 %) is
# not rounding: it would mean different noise or different conditioning. Different seeds
# differ by about 46 levels on average.
MAX_LEVELS_APART = 1
MAX_MEAN_DIFFERENCE = 0.01
MIN_MEAN_DIFFERENCE_BETWEEN_SEEDS = 5.0


def pixels(image: Image.Image) -> Pixels:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_image(batched: Pixels, alone: Pixels, what: str) -> None:
    assert batched.shape == alone.shape, what
    difference = np.abs(batched - alone)
    worst, mean = int(difference.max()), float(difference.mean())
    assert worst <= MAX_LEVELS_APART, f"{what}: max difference {worst}, mean {mean:.4g}"
    assert mean < MAX_MEAN_DIFFERENCE, f"{what}: mean difference {mean:.4g}"


def assert_different_images(first: Pixels, second: Pixels, what: str) -> None:
    difference = float(np.abs(first - second).mean())
    assert difference > MIN_MEAN_DIFFERENCE_BETWEEN_SEEDS, f"{what}: mean difference {difference}"


# ------------------------------------------------------------------ in-process renderer


@pytest.fixture(scope="module")
def renderer(renderer: KolorsRenderer) -> Iterator[KolorsRenderer]:
    """The session's renderer (conftest), on one thread while this module's tests run."""
    # One thread, as the farm's CPU workers run (OMP_NUM_THREADS=1): on a small, busy
    # machine several spinning intra-op threads make the tiny model many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield renderer
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "scheduler",
    [
        "EulerDiscreteScheduler",
        # Ancestral sampling draws fresh noise at every step from the generators too.
        "EulerAncestralDiscreteScheduler",
    ],
)
def test_an_image_rendered_in_a_batch_matches_it_rendered_alone(
    renderer: KolorsRenderer, scheduler: str
) -> None:
    params = KolorsParams(
        prompt="a red fox in the snow", width=512, height=512, steps=4, scheduler=scheduler
    )
    seeds = [SEED, SEED + 1, SEED + 2]
    steps_seen: list[tuple[int, int]] = []

    def on_step(step: int, steps: int) -> None:
        steps_seen.append((step, steps))

    batch = renderer.render(params, seeds, on_step, lambda: False)
    assert batch is not None and len(batch) == len(seeds)
    # One call, one denoising loop for all three images.
    assert [step for step, _ in steps_seen] == list(range(1, params.steps + 1))
    batched = [pixels(image) for image in batch]

    for index, seed in enumerate(seeds):
        alone = renderer.render(params, [seed], lambda _step, _steps: None, lambda: False)
        assert alone is not None and len(alone) == 1
        assert_same_image(batched[index], pixels(alone[0]), f"image {index} (seed {seed})")

    # Each image of the batch has its own seed: a shared generator or seed would repeat one.
    for first in range(len(seeds)):
        for second in range(first + 1, len(seeds)):
            assert_different_images(
                batched[first], batched[second], f"batch images {first} and {second}"
            )


# ------------------------------------------------------------------ a real worker process

WORKER = "batch-cpu0"


@pytest.fixture(scope="module")
def farm(module_farms: FarmFactory) -> RunningFarm:
    return module_farms.start(
        "batch",
        workers=[WORKER],
        # Every step shows in the status.
        settings={"render_batch_size": "3", "progress_interval_s": "0"},
    )


JOB = {
    "prompt": "a lighthouse at dusk",
    "width": 512,
    "height": 512,
    "steps": 12,
    "scheduler": "EulerAncestralDiscreteScheduler",
    "output_format": "png",  # lossless: the decoded pixels are the rendered ones
}


def submit(farm: RunningFarm, headers: dict[str, str], **fields: Any) -> str:
    response = httpx.post(f"{farm.url}/v2/kolors", json=JOB | fields, headers=headers)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["request_id"]
    return job_id


def status(farm: RunningFarm, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{farm.url}/v2/requests/{job_id}/status", headers=headers)
    body: dict[str, Any] = response.json()
    assert body["status"] != "FAILED", body
    return body


def completed(farm: RunningFarm, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    wait_for(
        lambda: status(farm, headers, job_id)["status"] == "COMPLETED",
        120,
        f"job {job_id} to complete",
        interval_s=0.05,
    )
    response = httpx.get(f"{farm.url}/v2/requests/{job_id}", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def stored_pixels(farm: RunningFarm, headers: dict[str, str], job_id: str, index: int) -> Pixels:
    response = httpx.get(f"{farm.url}/v2/requests/{job_id}/images/{index}", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return pixels(Image.open(io.BytesIO(response.content)))


@pytest.mark.e2e
def test_a_worker_rendering_three_per_call_gives_image_i_seed_plus_i(farm: RunningFarm) -> None:
    key = farm.processes.create_user("batcher", "10")
    headers = {"x-api-key": key}

    job_id = submit(farm, headers, seed=SEED, number_of_images=3)
    # The same images one job each, queued behind it (one user's jobs run in order).
    single_ids = [submit(farm, headers, seed=SEED + index) for index in range(3)]
    # Follow it while it renders: with three images per call there is one denoising loop,
    # so the step count never starts over and no image is recorded while another is still
    # part-way through its steps. One image per call would show the steps starting over,
    # with images_done 1 and 2.
    running: list[tuple[int, int]] = []
    deadline = time.monotonic() + 120
    while (body := status(farm, headers, job_id))["status"] != "COMPLETED":
        assert time.monotonic() < deadline, f"job {job_id} did not complete: {body}"
        progress = body["progress"]
        if body["status"] == "PROCESSING" and 0 < progress["step"] < progress["steps"]:
            running.append((progress["images_done"], progress["step"]))
        time.sleep(0.03)
    assert running, "never saw the job part-way through its steps"
    assert {done for done, _step in running} == {0}, running
    steps_in_order = [step for _done, step in running]
    assert steps_in_order == sorted(steps_in_order), running

    batch = completed(farm, headers, job_id)
    assert batch["seeds"] == [SEED, SEED + 1, SEED + 2]
    assert [output["generation"]["parameters"]["seed"] for output in batch["outputs"]] == [
        SEED,
        SEED + 1,
        SEED + 2,
    ]
    batched = [stored_pixels(farm, headers, job_id, index) for index in range(3)]

    for index, single_id in enumerate(single_ids):
        single = completed(farm, headers, single_id)
        assert single["seeds"] == [SEED + index]
        alone = stored_pixels(farm, headers, single_id, 0)
        assert_same_image(batched[index], alone, f"image {index} vs seed {SEED + index} alone")
    assert_different_images(batched[1], batched[2], "images 1 and 2")
    assert_different_images(batched[0], batched[1], "images 0 and 1")
