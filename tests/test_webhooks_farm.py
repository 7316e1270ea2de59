"""Webhooks on a running farm: the delivery worker is its own Celery worker process.

One farm (SQLite; the SQL parts run on both databases in tests/test_webhooks.py)
with a render worker on the tiny checkpoint, the dispatcher, the API, the
delivery worker and a real receiver on loopback (allowed by the farm's settings).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from api.schemas import JobResult
from tests.farms import FarmFactory
from tests.processes import FarmProcesses, wait_for
from tests.webhook_receiver import Receiver, running_receiver

WEBHOOK_WORKER = "webhooks"
# A random seed each: no request is answered from the result cache (never rendered).
FAST = {"width": 512, "height": 512, "steps": 2, "seed": -1}
PUBLIC_BASE = "https://farm.example"


@dataclass
class Farm:
    url: str
    processes: FarmProcesses
    receiver: Receiver
    key: str

    def start_webhook_worker(self) -> None:
        self.processes.start_webhook_worker(WEBHOOK_WORKER)

    def submit(self, **fields: Any) -> str:
        answer = httpx.post(
            f"{self.url}/v2/kolors",
            json={"prompt": "a lighthouse", **FAST, **fields},
            headers={"x-api-key": self.key},
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        return str(answer.json()["request_id"])

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers={"x-api-key": self.key}, timeout=30)

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.get(f"/v2/requests/{job_id}/webhooks").json()[
            "deliveries"
        ]
        return found

    def wait_state(
        self, job_id: str, event: str, state: str, timeout_s: float = 60
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            for delivery in self.deliveries(job_id):
                if delivery["event"] == event and delivery["state"] == state:
                    return delivery
            return None

        return wait_for(reached, timeout_s, f"{event} delivery of {job_id} to be {state}")

    def secret(self) -> str:
        return self.processes.cli("webhooks", "secret", "hooks").strip().splitlines()[-1]


@pytest.fixture(scope="module")
def farm(module_farms: FarmFactory) -> Iterator[Farm]:
    with running_receiver() as receiver:
        running = module_farms.start(
            "hooks",
            webhook_worker=True,
            settings={
                "warmup": "false",
                "public_base_url": PUBLIC_BASE,
                "webhook_allow_nets": "127.0.0.0/8",
                "webhook_backoff_s": "0.5,1,2,4",
                "webhook_timeout_s": "3",
                "webhook_lease_s": "5",
                "webhook_sweep_interval_s": "0.2",
            },
        )
        try:
            key = running.processes.create_user("hooks", "1000")
            yield Farm(url=running.url, processes=running.processes, receiver=receiver, key=key)
        finally:
            receiver.release.set()
            running.stop()  # before the receiver closes


def _verified(farm: Farm, path: str, index: int = -1) -> dict[str, Any]:
    got = wait_for(lambda: farm.receiver.at(path), 60, f"a request at {path}")[index]
    body: dict[str, Any] = Webhook(farm.secret()).verify(got.body, got.headers)
    return body


def test_completed_event_is_signed_and_is_the_request_s_result(farm: Farm) -> None:
    job_id = farm.submit(webhook=farm.receiver.script("/done", "200"))
    delivery = farm.wait_state(job_id, "completed", "delivered")
    body = _verified(farm, "/done")
    assert body["request_id"] == job_id and body["status"] == "COMPLETED"
    JobResult.model_validate(body)
    assert body["output"] and all(
        link.startswith(f"{PUBLIC_BASE}/v2/results/") for link in body["output"]
    )
    shown = farm.get(f"/v2/requests/{job_id}").json()
    for volatile in ("output", "outputs", "output_expires_at"):
        assert volatile in body
        body.pop(volatile), shown.pop(volatile)
    assert body == shown
    (got,) = farm.receiver.at("/done")
    assert got.headers["webhook-id"] == delivery["webhook_id"]
    assert [a["status_code"] for a in delivery["attempt_log"]] == [200]
    assert [d["event"] for d in farm.deliveries(job_id)] == ["completed"]


def test_start_and_completed_filters(farm: Farm) -> None:
    both = farm.submit(
        webhook=farm.receiver.url("/both"), webhook_events_filter=["start", "completed"]
    )
    only_start = farm.submit(webhook=farm.receiver.url("/start"), webhook_events_filter=["start"])
    farm.wait_state(both, "completed", "delivered")
    farm.wait_state(both, "start", "delivered")
    farm.wait_state(only_start, "start", "delivered")
    started = _verified(farm, "/start")
    assert started["request_id"] == only_start and "progress" in started
    wait_for(
        lambda: farm.get(f"/v2/requests/{only_start}/status").json()["status"] == "COMPLETED",
        60,
        "the start-only request to complete",
    )
    assert [d["event"] for d in farm.deliveries(only_start)] == ["start"]
    assert sorted(d["event"] for d in farm.deliveries(both)) == ["completed", "start"]
    assert len(farm.receiver.at("/start")) == 1


def test_retries_failures_disabling_and_redelivery(farm: Farm) -> None:
    flaky = farm.submit(webhook=farm.receiver.script("/flaky", "500", "200"))
    bad = farm.submit(webhook=farm.receiver.script("/bad", "400"))
    gone = farm.submit(webhook=farm.receiver.script("/gone", "410", "200"))
    delivered = farm.wait_state(flaky, "completed", "delivered")
    assert [a["status_code"] for a in delivered["attempt_log"]] == [500, 200]
    failed = farm.wait_state(bad, "completed", "failed")
    assert [a["status_code"] for a in failed["attempt_log"]] == [400]
    farm.wait_state(gone, "completed", "disabled")
    # The URL is disabled for the tenant: the next request's event is skipped, never sent.
    skipped = farm.submit(webhook=farm.receiver.url("/gone"))
    farm.wait_state(skipped, "completed", "disabled")
    assert len(farm.receiver.at("/gone")) == 1
    redone = httpx.post(
        f"{farm.url}/v2/requests/{skipped}/webhooks/redeliver",
        headers={"x-api-key": farm.key},
        timeout=30,
    )
    assert redone.status_code == 202
    farm.wait_state(skipped, "completed", "delivered")
    assert _verified(farm, "/gone")["request_id"] == skipped
    # The 400 was never tried again (a later request's delivery went through meanwhile).
    assert len(farm.receiver.at("/bad")) == 1


def test_receiver_down_then_up_gets_the_delivery_later(farm: Farm) -> None:
    with running_receiver() as later:
        port = later.port
    job_id = farm.submit(webhook=f"http://127.0.0.1:{port}/later")
    wait_for(
        lambda: any(d["attempts"] >= 1 for d in farm.deliveries(job_id)),
        60,
        "a failed first attempt",
    )
    with running_receiver(port) as back:
        delivery = farm.wait_state(job_id, "completed", "delivered")
        (got,) = back.at("/later")
    assert delivery["attempt_log"][0]["status_code"] is None
    assert "Connect" in delivery["attempt_log"][0]["error"]
    assert got.headers["webhook-id"] == delivery["webhook_id"]


def test_a_hanging_receiver_never_slows_a_render(farm: Farm) -> None:
    hanging = farm.receiver.script("/hang", "hang")
    job_id = farm.submit(webhook=hanging, webhook_events_filter=["start", "completed"])
    wait_for(lambda: farm.receiver.at("/hang"), 60, "the receiver to hang on an event")
    status = wait_for(
        lambda: (
            (s := farm.get(f"/v2/requests/{job_id}/status").json())["status"] == "COMPLETED" and s
        ),
        60,
        "the render to complete while the receiver hangs",
    )
    assert status["status"] == "COMPLETED"
    other = farm.submit()
    wait_for(
        lambda: farm.get(f"/v2/requests/{other}/status").json()["status"] == "COMPLETED",
        60,
        "another render to complete",
    )
    delivery = farm.wait_state(job_id, "start", "pending")
    assert delivery["attempt_log"] == [] or delivery["attempt_log"][0]["error"] == "timed out"


def test_delivery_survives_kill_9_of_its_worker_mid_delivery(farm: Farm) -> None:
    job_id = farm.submit(webhook=farm.receiver.script("/killed", "hang", "200"))
    wait_for(lambda: farm.receiver.at("/killed"), 60, "the delivery to be under way")
    farm.processes.kill(WEBHOOK_WORKER, signal.SIGKILL)
    farm.start_webhook_worker()
    delivery = farm.wait_state(job_id, "completed", "delivered")
    first, *_, last = farm.receiver.at("/killed")
    assert first.headers["webhook-id"] == last.headers["webhook-id"] == delivery["webhook_id"]
    assert Webhook(farm.secret()).verify(last.body, last.headers)["request_id"] == job_id


def test_after_a_rotation_both_secrets_verify(farm: Farm) -> None:
    old = farm.secret()
    new = farm.processes.cli("webhooks", "rotate", "hooks").strip().splitlines()[-1]
    assert new != old and new.startswith("whsec_") and farm.secret() == new
    job_id = farm.submit(webhook=farm.receiver.url("/rotated"))
    farm.wait_state(job_id, "completed", "delivered")
    (got,) = farm.receiver.at("/rotated")
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(got.body, got.headers)["request_id"] == job_id
    assert json.loads(got.body)["status"] == "COMPLETED"


def test_a_request_answered_from_the_cache_sends_its_events(farm: Farm) -> None:
    same = {"seed": 4242, "prompt": "a cached lighthouse"}
    first = farm.submit(**same)
    wait_for(
        lambda: farm.get(f"/v2/requests/{first}/status").json()["status"] == "COMPLETED",
        60,
        "the first render",
    )
    hit = farm.submit(
        **same, webhook=farm.receiver.url("/cached"), webhook_events_filter=["start", "completed"]
    )
    farm.wait_state(hit, "start", "delivered")
    farm.wait_state(hit, "completed", "delivered")
    body = next(
        body
        for index in range(len(farm.receiver.at("/cached")))
        if "outputs" in (body := _verified(farm, "/cached", index))
    )
    assert body["request_id"] == hit and body["status"] == "COMPLETED"
    assert [output["cached"] for output in body["outputs"]] == [True]
