"""End to end on real processes: Redis, a Celery worker subprocess on the tiny checkpoint,
the API under gunicorn, driven over HTTP and through the official `segmind` SDK."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import segmind
from PIL import Image

from tests.farms import FarmFactory
from tests.processes import FarmProcesses

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
SEGMIND_SAMPLE = {  # Segmind's own Kolors sample request, sent as form data
    "prompt": "a cute panda eating bamboo, studio ghibli style",
    "negative_prompt": "ugly, deformed",
    "cfg": "6",
    "seed": "441234134",
    "steps": "25",
    "width": "1024",
    "height": "1024",
    "scheduler": "EulerDiscreteScheduler",
    "output_format": "webp",
    "output_quality": "80",
    "number_of_images": "1",
}


@dataclass
class Farm:
    """A running farm and how to reach it."""

    url: str
    processes: FarmProcesses

    def create_user(self, name: str, credits: str) -> str:
        return self.processes.create_user(name, credits)


@pytest.fixture(scope="module")
def farm(module_farms: FarmFactory) -> Farm:
    running = module_farms.start(
        "e2e",
        # These tests count renders and charges of repeated requests; the result cache
        # would answer the repeats (tests/test_cache.py covers it).
        settings={"sync_timeout_s": "120", "cache": "false"},
    )
    return Farm(url=running.url, processes=running.processes)


def credits_of(farm: Farm, key: str) -> str:
    response = httpx.get(f"{farm.url}/v1/get-user-credits", headers={"x-api-key": key})
    assert response.status_code == 200
    credits: str = response.json()["credits"]
    assert response.headers["x-remaining-credits"] == credits
    return credits


def test_segmind_sample_as_form_data_returns_a_1024_webp(farm: Farm) -> None:
    key = farm.create_user("sample", "10")
    response = httpx.post(
        f"{farm.url}/v1/kolors", data=SEGMIND_SAMPLE, headers={"x-api-key": key}, timeout=180
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(response.content))
    assert (image.format, image.size) == ("WEBP", (1024, 1024))
    assert response.headers["x-seed"] == "441234134"
    assert response.headers["x-remaining-credits"] == "9"
    assert credits_of(farm, key) == "9"
    again = httpx.post(
        f"{farm.url}/v1/kolors", data=SEGMIND_SAMPLE, headers={"x-api-key": key}, timeout=180
    )
    assert again.content == response.content
    other = httpx.post(
        f"{farm.url}/v1/kolors",
        data=SEGMIND_SAMPLE | {"seed": "1"},
        headers={"x-api-key": key},
        timeout=180,
    )
    assert other.status_code == 200 and other.content != response.content
    assert credits_of(farm, key) == "7"


def test_sdk_run_sync_run_and_submit_async(farm: Farm) -> None:
    key = farm.create_user("sdk", "5")
    client = segmind.SegmindClient(api_key=key, base_url=f"{farm.url}/v1", timeout=180)
    params = {"prompt": "山水画, misty mountains", "width": 512, "height": 512, "seed": 11}

    sync = client.run_sync("kolors", **params)
    assert Image.open(io.BytesIO(sync.content)).size == (512, 512)

    result = client.run("kolors", **params)
    assert result["status"] == "COMPLETED"
    assert result["seeds"] == [11]
    (url,) = result["output"]
    fetched = httpx.get(url, headers={"x-api-key": key})
    assert fetched.status_code == 200
    assert fetched.content == sync.content  # same seed and parameters, same bytes

    job = client.submit_async("kolors", **params, number_of_images=2, output_format="png")
    done = job.wait(timeout=180, interval=0.2)
    assert done["status"] == "COMPLETED"
    assert done["seeds"] == [11, 12]
    assert len(done["output"]) == 2
    assert done["metrics"]["render_seconds"] >= 0
    # 512x512 at 25 steps is 0.25 credit an image: 5 - 4 x 0.25
    assert credits_of(farm, key) == "4"


def test_sdk_reports_failures_the_segmind_way(farm: Farm) -> None:
    key = farm.create_user("sdk-errors", "0.2")
    client = segmind.SegmindClient(api_key=key, base_url=f"{farm.url}/v1", timeout=60)
    with pytest.raises(segmind.SegmindError) as not_enough:
        client.run_sync("kolors", prompt="x")
    assert (not_enough.value.status, not_enough.value.detail) == (406, "Not enough credits")
    with pytest.raises(segmind.SegmindError) as invalid:
        client.submit_async("kolors", prompt="x", steps=99)
    assert invalid.value.status == 400
    assert invalid.value.detail is not None and invalid.value.detail.startswith("steps:")
    bad_key = segmind.SegmindClient(api_key="kf_nope", base_url=f"{farm.url}/v1")
    with pytest.raises(segmind.SegmindError) as unauthorized:
        bad_key.run_sync("kolors", prompt="x")
    assert unauthorized.value.status == 401


def test_json_with_base64_returns_every_image(farm: Farm) -> None:
    import base64

    key = farm.create_user("b64", "5")
    response = httpx.post(
        f"{farm.url}/v1/kolors",
        json={
            "prompt": "x",
            "width": 512,
            "height": 512,
            "number_of_images": 2,
            "base64": True,
            "output_format": "jpeg",
        },
        headers={"x-api-key": key},
        timeout=180,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["seeds"] == [441234134, 441234135]
    images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in body["images"]]
    assert [image.format for image in images] == ["JPEG", "JPEG"]
    assert body["image"] == body["images"][0]


def test_status_shows_progress_while_running(farm: Farm) -> None:
    key = farm.create_user("progress", "50")
    headers = {"x-api-key": key}
    submitted = httpx.post(
        f"{farm.url}/v2/kolors",
        json={"prompt": "x", "width": 1024, "height": 1024, "steps": 50, "number_of_images": 3},
        headers=headers,
    ).json()
    seen: set[str] = set()
    steps_seen: set[int] = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = httpx.get(submitted["status_url"], headers=headers).json()
        seen.add(status["status"])
        if status["status"] == "PROCESSING":
            steps_seen.add(status["progress"]["step"])
        if status["status"] in ("COMPLETED", "FAILED"):
            break
        time.sleep(0.05)
    assert status["status"] == "COMPLETED"
    assert "PROCESSING" in seen
    assert len(steps_seen - {0}) >= 2  # step progress moved while it rendered
    assert status["progress"]["images_done"] == 3


def test_readiness_reports_each_workers_device_memory_and_warm_state(farm: Farm) -> None:
    body = httpx.get(f"{farm.url}/readyz").json()
    worker = body["workers"]["e2e-cpu0"]
    assert worker["device"] == "cpu" and worker["device_name"] == "cpu"
    assert 0 < worker["memory_free_bytes"] <= worker["memory_total_bytes"]
    assert worker["warm"] is True  # warmed up before it took its first job
    assert body["dispatcher"]
