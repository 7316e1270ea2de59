"""Cancelling a RUNNING job over HTTP, on real processes: it stops at its next diffusion step.

A CPU worker on the tiny checkpoint, the dispatcher and the API under gunicorn, with their
own Redis database and SQLite file. Everything is observed from outside: HTTP responses and
the worker's log.
"""

from __future__ import annotations

import io
import time
from decimal import ROUND_CEILING, Decimal
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.farms import FarmFactory, RunningFarm
from tests.processes import wait_for

pytestmark = pytest.mark.e2e

WORKER = "cancel-cpu0"
# Big enough to be caught mid-render: on the tiny checkpoint a 512x512 step takes about
# 0.03 s on one CPU thread, so 4 images x 50 steps take several seconds.
STEPS = 50
IMAGES = 4
SEED = 1234
JOB = {
    "prompt": "a lighthouse at dusk",
    "width": 512,
    "height": 512,
    "steps": STEPS,
    "number_of_images": IMAGES,
    "seed": SEED,
    "output_format": "png",
}


def image_price(width: int, height: int, steps: int) -> Decimal:
    """The README's price: 1 credit for 1024x1024 at 25 steps, linear, rounded up to 0.001."""
    exact = Decimal(width * height * steps) / Decimal(1024 * 1024 * 25)
    return exact.quantize(Decimal("0.001"), rounding=ROUND_CEILING)


PRICE = image_price(512, 512, STEPS)  # 0.25 * 50 / 25 = 0.5 credit an image


@pytest.fixture(scope="module")
def farm(module_farms: FarmFactory) -> RunningFarm:
    return module_farms.start(
        "cancel",
        workers=[WORKER],
        # Every step is written, so the step it stopped at shows.
        settings={"progress_interval_s": "0"},
    )


def credits_of(farm: RunningFarm, key: str) -> Decimal:
    response = httpx.get(f"{farm.url}/v1/get-user-credits", headers={"x-api-key": key})
    assert response.status_code == 200, response.text
    credits: str = response.json()["credits"]
    assert response.headers["x-remaining-credits"] == credits
    return Decimal(credits)


def test_delete_stops_a_running_job_at_its_next_step(farm: RunningFarm) -> None:
    key = farm.processes.create_user("canceller", "10")
    headers = {"x-api-key": key}
    before = credits_of(farm, key)
    assert before == Decimal(10)

    submitted = httpx.post(f"{farm.url}/v2/kolors", json=JOB, headers=headers)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["request_id"]
    status_url = submitted.json()["status_url"]
    # The whole price is held at submission.
    assert credits_of(farm, key) == before - IMAGES * PRICE

    def status() -> tuple[int, dict[str, Any]]:
        response = httpx.get(status_url, headers=headers)
        body: dict[str, Any] = response.json()
        return response.status_code, body

    # Cancel while an image after the first renders, early in its steps: the first image is
    # then delivered (and must stay charged) and the cancel reaches the worker with at least
    # half of the current image's steps left, so "stops at the next step" and "stops after
    # the current image" give different results.
    def caught_mid_image() -> dict[str, Any] | None:
        code, body = status()
        assert body["status"] in ("QUEUED", "PROCESSING"), (code, body)
        progress: dict[str, Any] = body["progress"]
        if (
            body["status"] == "PROCESSING"
            and 1 <= progress["images_done"] < IMAGES
            and 1 <= progress["step"] <= STEPS // 2
        ):
            return progress
        return None

    at_cancel = wait_for(caught_mid_image, 120, "the job mid-render", interval_s=0.01)
    rendering = at_cancel["images_done"]  # the index of the image being rendered
    assert at_cancel["steps"] == STEPS and at_cancel["images"] == IMAGES

    cancelled = httpx.delete(f"{farm.url}/v2/requests/{job_id}", headers=headers)
    assert cancelled.status_code == 200, cancelled.text
    first = cancelled.json()
    assert first["status"] == "PROCESSING"  # it stops at its next step, not at once
    assert first["cancelled"] is True
    assert "already ended" not in first.get("detail", "")

    # Follow the job to its end, keeping the last progress seen while it still ran.
    last_running = at_cancel
    deadline = time.monotonic() + 60
    while True:
        code, body = status()
        if body["status"] != "PROCESSING":
            break
        last_running = body["progress"]
        assert time.monotonic() < deadline, f"job still running after the cancel: {body}"
        time.sleep(0.01)

    # It ended as the README says: FAILED, cancelled, served with 422.
    assert code == 422, body
    assert body["status"] == "FAILED" and body["cancelled"] is True, body
    assert body["error"]

    # It stopped inside the image it was rendering: that image was never delivered...
    delivered = body["progress"]["images_done"]
    assert delivered == rendering, (
        f"cancelled at step {at_cancel['step']}/{STEPS} of image {rendering}, "
        f"but {delivered} of {IMAGES} images were delivered"
    )
    # ...no progress ever showed that image's last step...
    assert last_running["images_done"] == rendering, last_running
    assert last_running["step"] < STEPS, last_running
    steps_done = rendering * STEPS + last_running["step"]
    assert steps_done < IMAGES * STEPS
    # ...and the worker says it stopped mid-render.
    worker_log = farm.processes.log(WORKER)
    assert f"job {job_id}: stopped mid-render" in worker_log, worker_log[-3000:]

    # The delivered images are served and carry seeds seed + i; the rest do not exist.
    result = httpx.get(f"{farm.url}/v2/requests/{job_id}", headers=headers)
    assert result.status_code == 422, result.text
    assert result.json()["cancelled"] is True
    assert result.json()["seeds"] == [SEED + i for i in range(delivered)]
    assert len(result.json()["output"]) == delivered
    for index in range(delivered):
        image = httpx.get(f"{farm.url}/v2/requests/{job_id}/images/{index}", headers=headers)
        assert image.status_code == 200
        assert Image.open(io.BytesIO(image.content)).size == (512, 512)
    missing = httpx.get(f"{farm.url}/v2/requests/{job_id}/images/{delivered}", headers=headers)
    assert missing.status_code == 404

    # The delivered images stay charged; the undelivered ones are released.
    after = credits_of(farm, key)
    assert after == before - delivered * PRICE, (before, after, delivered)

    # Cancelling again says it had already ended and changes nothing.
    again = httpx.delete(f"{farm.url}/v2/requests/{job_id}", headers=headers)
    # The README does not say which code a repeated cancel gets; either is an answer.
    assert again.status_code in (200, 422), again.text
    second = again.json()
    assert second["status"] == "FAILED" and second["cancelled"] is True
    assert "already ended" in second["detail"], second
    assert credits_of(farm, key) == after
    code, final = status()
    assert code == 422 and final["status"] == "FAILED"
    assert final["progress"]["images_done"] == delivered
    assert final["finished_at"] == body["finished_at"]
