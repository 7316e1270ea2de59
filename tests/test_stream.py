"""The progress stream, GET /v2/requests/{id}/events, against a real farm under gunicorn.

One module-scoped farm (a render worker on the tiny checkpoint, the dispatcher and
the API as processes). SQLite is enough: a stream reads its job through the same
read-only queries as the status route, which run on both databases elsewhere; what
is under test here is Redis, the fan-out and the API server's threads.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.farms import FarmFactory, RunningFarm
from tests.processes import wait_for

pytestmark = pytest.mark.e2e

WORKER = "stream-worker"
STREAMS = 500
SMALL = {"prompt": "a lighthouse", "width": 512, "height": 512, "output_format": "png"}


@dataclass
class Event:
    """One Server-Sent Event as a client parses it."""

    event: str
    id: str | None
    data: str

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Parser:
    """A tiny SSE parser: feed it lines, collect events and comments."""

    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    _fields: dict[str, list[str]] = field(default_factory=dict)

    def feed(self, line: str) -> Event | None:
        if line == "":
            if "data" not in self._fields:
                self._fields.clear()
                return None
            event = Event(
                event=self._fields.get("event", ["message"])[-1],
                id=self._fields.get("id", [None])[-1],
                data="\n".join(self._fields["data"]),
            )
            self._fields.clear()
            self.events.append(event)
            return event
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        self._fields.setdefault(name, []).append(value.removeprefix(" "))
        return None


def read_stream(
    url: str, headers: dict[str, str], stop_after: int | None = None, **params: str
) -> tuple[list[Event], bool]:
    """Read a stream's events (at most `stop_after`); and whether the server closed it."""
    parser = Parser()
    with httpx.stream("GET", url, headers=headers, params=params, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if parser.feed(line) is not None and len(parser.events) == stop_after:
                return parser.events, False
    return parser.events, True


def public(event: Event) -> tuple[str, str | None, Any]:
    """An event without what differs between two reads (fresh links and their expiry)."""
    data = event.json
    if event.event == "completed":
        data = {key: data[key] for key in ("request_id", "status", "seeds", "error", "cancelled")}
    return event.event, event.id, data


@pytest.fixture(scope="module")
def farm(module_farms: FarmFactory) -> RunningFarm:
    return module_farms.start(
        "stream",
        workers=[WORKER],
        settings={"progress_interval_s": "0", "stream_heartbeat_s": "2"},  # every step an event
    )


@pytest.fixture(scope="module")
def key(farm: RunningFarm) -> dict[str, str]:
    return {"x-api-key": farm.processes.create_user("streamer", "1000")}


def submit(farm: RunningFarm, key: dict[str, str], **params: Any) -> str:
    # A prompt of its own: never answered from the result cache, always rendered.
    body = SMALL | {"prompt": f"a lighthouse {uuid.uuid4().hex}"} | params
    response = httpx.post(f"{farm.url}/v2/kolors", json=body, headers=key, timeout=30)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["request_id"]
    return job_id


def events_url(farm: RunningFarm, job_id: str) -> str:
    return f"{farm.url}/v2/requests/{job_id}/events"


def test_a_render_streams_status_then_progress_in_order_then_its_result(
    farm: RunningFarm, key: dict[str, str]
) -> None:
    job_id = submit(farm, key, steps=30, number_of_images=2)
    # From the start of its log ("0-0"): every event, whenever the stream opens.
    events, closed = read_stream(events_url(farm, job_id), key, last_event_id="0-0")
    assert closed
    names = [event.event for event in events]
    # QUEUED first when it had not started yet (a snapshot), then PROCESSING, from the log.
    statuses = [event.json["status"] for event in events if event.event == "status"]
    assert names[0] == "status" and statuses[-1] == "PROCESSING"
    assert names.index("progress") > names.index("status", len(statuses) - 1)
    assert names[-1] == "completed" and names.count("completed") == 1
    progress = [event.json for event in events if event.event == "progress"]
    done = [p["images_done"] for p in progress]
    assert done == sorted(done) and done[-1] == 1  # the last image is recorded with the end
    steps = [p["step"] for p in progress]
    # Steps rise to 30 for each image in turn (images render one after the other).
    restarts = [i for i in range(1, len(steps)) if steps[i] < steps[i - 1]]
    assert len(restarts) == 1 and steps[restarts[0] - 1] == 30 and steps[-1] == 30
    assert {p["steps"] for p in progress} == {30} and {p["images"] for p in progress} == {2}
    positions = [tuple(map(int, event.id.split("-"))) for event in events if event.id]
    assert len(positions) == len(events) and positions == sorted(set(positions))
    final = events[-1].json
    result = httpx.get(f"{farm.url}/v2/requests/{job_id}", headers=key, timeout=30).json()
    assert final["status"] == "COMPLETED" and final["request_id"] == job_id
    assert final["seeds"] == result["seeds"] and len(final["output"]) == 2
    assert set(final) == set(result)
    image = httpx.get(final["output"][1], timeout=30)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_last_event_id_resumes_without_duplicates_or_gaps(
    farm: RunningFarm, key: dict[str, str]
) -> None:
    job_id = submit(farm, key, steps=25, number_of_images=2)
    url = events_url(farm, job_id)
    first, closed = read_stream(url, key, stop_after=4, last_event_id="0-0")
    assert not closed and first[-1].id is not None
    # The header, as an EventSource sends it when it reconnects.
    rest, closed = read_stream(url, key | {"Last-Event-ID": first[-1].id})
    assert closed and rest[-1].event == "completed"
    everything, closed = read_stream(url, key, last_event_id="0-0")
    assert closed
    # (A snapshot of a request not started yet has id 0-0: the log was empty.)
    seen = [public(e) for e in first + rest if e.id != "0-0"]
    assert seen == [public(e) for e in everything]
    ids = [e.id for e in first + rest]
    assert len(ids) == len(set(ids))


def test_a_finished_request_answers_its_final_event_at_once(
    farm: RunningFarm, key: dict[str, str]
) -> None:
    job_id = submit(farm, key, steps=2)
    status_url = f"{farm.url}/v2/requests/{job_id}/status"
    wait_for(
        lambda: httpx.get(status_url, headers=key, timeout=30).json()["status"] == "COMPLETED",
        60,
        "the render",
    )
    events, closed = read_stream(events_url(farm, job_id), key)
    assert closed and [e.event for e in events] == ["completed"]
    assert events[0].json["status"] == "COMPLETED" and events[0].json["request_id"] == job_id


def test_another_tenants_request_is_a_404_and_no_key_a_401(
    farm: RunningFarm, key: dict[str, str]
) -> None:
    job_id = submit(farm, key, steps=2)
    other = {"x-api-key": farm.processes.create_user("outsider", "10", tenant="elsewhere")}
    response = httpx.get(events_url(farm, job_id), headers=other, timeout=30)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert httpx.get(events_url(farm, job_id), timeout=30).status_code == 401
    bad = httpx.get(events_url(farm, job_id), headers=key | {"Last-Event-ID": "x"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "Last-Event-ID"


async def _open_streams(
    url: str, key: dict[str, str], count: int, opened: asyncio.Event
) -> list[tuple[list[Event], list[str], bool]]:
    """Open `count` streams; set `opened` once each got its first event; read them to the end."""
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        first_events = 0

        async def one() -> tuple[list[Event], list[str], bool]:
            nonlocal first_events
            parser = Parser()
            async with client.stream("GET", url, headers=key) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if parser.feed(line) is not None and len(parser.events) == 1:
                        first_events += 1
                        if first_events == count:
                            opened.set()
            return parser.events, parser.comments, True

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        return await asyncio.gather(*tasks)


def test_500_idle_streams_leave_other_routes_answering_and_all_get_the_end(
    farm: RunningFarm, key: dict[str, str]
) -> None:
    # Nothing releases jobs now: the request stays QUEUED until it is cancelled.
    farm.processes.kill("dispatcher")
    job_id = submit(farm, key, steps=2)
    status_url = f"{farm.url}/v2/requests/{job_id}/status"

    async def scenario() -> list[tuple[list[Event], list[str], bool]]:
        opened = asyncio.Event()
        streams = asyncio.create_task(_open_streams(events_url(farm, job_id), key, STREAMS, opened))
        await asyncio.wait_for(opened.wait(), 60)
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(5):
                health = await client.get(f"{farm.url}/healthz")
                assert health.status_code == 200 and health.json() == {"status": "ok"}
                status = await client.get(status_url, headers=key)
                assert status.status_code == 200 and status.json()["status"] == "QUEUED"
            await asyncio.sleep(2.5)  # idle past a heartbeat
            cancelled = await client.post(f"{farm.url}/v2/requests/{job_id}/cancel", headers=key)
            assert cancelled.status_code == 200
        return await asyncio.wait_for(streams, 60)

    results = asyncio.run(scenario())
    farm.processes.start_dispatcher("dispatcher-again")
    assert len(results) == STREAMS
    for events, _comments, closed in results:
        assert closed
        assert [e.event for e in events] == ["status", "completed"]
        assert events[0].json["status"] == "QUEUED"
        assert events[0].json["queue_position"] is not None
        final = events[1].json
        assert final["status"] == "FAILED" and final["cancelled"] is True
        assert final["request_id"] == job_id
    assert sum("keep-alive" in comments for _, comments, _ in results) == STREAMS
