"""GET /v2/requests/{id}/events: a request's status, progress and result as Server-Sent Events.

A stream reads its job's row once, at the start (the tenant check and the current
state, in the status route's short read-only transaction), and afterwards only
Redis: each API process holds ONE subscription to the farm-wide events channel
(`shared.jobs.events.EVENTS_CHANNEL`) and fans its messages out to the queues of its
open streams, so 500 streams cost 500 waiting threads and queues, no Redis or
database connection each. Every event is also in its job's capped Redis Stream,
whose entry ids are the events' ids: `Last-Event-ID` replays what a client missed
from there, then it goes on live; whatever the hub may have dropped (a Redis
reconnect, a client too slow) is re-read from the same log. The final event
carries the same JSON as GET /v2/requests/{id}, read when the job ends.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from flask import Blueprint, Flask, Response, current_app, request, stream_with_context
from pydantic import BaseModel, ConfigDict, Field

from api.auth import authenticated, current_principal
from api.context import farm
from api.errors import problem
from api.schemas import Progress, PublicStatus
from api.spec import HeaderParameter, operation, parse_query
from shared.errors import FarmError, InvalidParams, ServiceUnavailable
from shared.jobs.events import (
    EVENTS_CHANNEL,
    PROGRESS_EVENT,
    STATE_EVENT,
    JobEvent,
    event_position,
    last_event_id,
    parse_published_event,
    read_events_after,
    read_events_from,
)
from shared.jobs.status import read_result, read_status
from shared.models import TERMINAL_STATES, JobState
from shared.redis_client import make_redis
from shared.resources import Resources

log = logging.getLogger(__name__)
bp = Blueprint("stream", __name__)

HUB_KEY: Final = "kolors_farm_event_hub"
# An event id is a Redis Stream entry id, "ms-seq": Redis refuses parts of 2^64 and more,
# so 19 digits each (ids are milliseconds and small counters). "0" is what SSE clients
# send to start over: the same as "0-0", the whole log.
EVENT_ID_PATTERN: Final = r"^(0|[0-9]{1,19}-[0-9]{1,19})$"
FROM_THE_START: Final = "0-0"
EVENT_ID_EXAMPLES: Final = ["0", "1733212345678-0"]
LAST_EVENT_ID_HEADER: Final = "Last-Event-ID"
# Events a stream may fall behind by before it stops queueing them and re-reads the log.
SUBSCRIBER_BACKLOG: Final = 256
# How long a client waits before reconnecting after a cut (the SSE `retry` field), in ms.
RETRY_MS: Final = 3000
_TERMINAL = {state.value for state in TERMINAL_STATES}


class EventsQuery(BaseModel):
    """Query parameters of the events route."""

    model_config = ConfigDict(extra="forbid")

    last_event_id: str | None = Field(
        default=None,
        pattern=EVENT_ID_PATTERN,
        examples=EVENT_ID_EXAMPLES,
        description="Resume after this event, for clients that cannot send `Last-Event-ID` "
        "(`0` or `0-0`: the request's whole log).",
    )


class StatusEvent(BaseModel):
    """The data of a `status` event: the request's state, queue position, ETA and progress."""

    request_id: str
    status: PublicStatus
    queue_position: int | None = None
    eta_seconds: float | None = None
    progress: Progress


class ProgressEvent(BaseModel):
    """The data of a `progress` event: step of steps of the current image, images done."""

    request_id: str
    step: int
    steps: int
    images_done: int
    images: int


LAST_EVENT_ID = HeaderParameter(
    LAST_EVENT_ID_HEADER,
    "Resume after this event id (what an SSE client sends when it reconnects; "
    "`0` or `0-0`: the request's whole log).",
    lambda _settings: {
        "type": "string",
        "pattern": EVENT_ID_PATTERN,
        "examples": EVENT_ID_EXAMPLES,
    },
)


# ---------------------------------------------------------------- the fan-out hub

_HUBS: list[EventHub] = []  # this process's (one per app)


def close_streams() -> None:
    """End this process's open streams (gunicorn is stopping the worker)."""
    for hub in _HUBS:
        hub.close_all()


@dataclass(eq=False)
class Subscriber:
    """One open stream's queue of events; a backlog too long becomes a re-read of the log."""

    job_id: str
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _items: deque[JobEvent] = field(default_factory=deque)
    _resync: bool = False
    closed: bool = False

    def push(self, event: JobEvent) -> None:
        """Queue an event (hub thread)."""
        with self._cond:
            if len(self._items) >= SUBSCRIBER_BACKLOG:
                self._items.clear()
                self._resync = True
            else:
                self._items.append(event)
            self._cond.notify()

    def resync(self) -> None:
        """Ask the stream to re-read its job's log (events may have been missed)."""
        with self._cond:
            self._items.clear()
            self._resync = True
            self._cond.notify()

    def close(self) -> None:
        """End the stream at its next wake-up (the server is stopping)."""
        with self._cond:
            self.closed = True
            self._cond.notify()

    def take(self, timeout_s: float) -> tuple[list[JobEvent], bool]:
        """Wait up to `timeout_s` for events: those queued, and whether to re-read the log."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._items or self._resync or self.closed, max(0.0, timeout_s)
            )
            items, resync = list(self._items), self._resync
            self._items.clear()
            self._resync = False
        return items, resync


class EventHub:
    """One subscription to the farm's events channel per API process, fanned out to streams."""

    def __init__(self, redis_url: str, max_streams: int) -> None:
        self._redis_url = redis_url
        self._lock = threading.Lock()
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._thread: threading.Thread | None = None
        self.slots = threading.BoundedSemaphore(max_streams)
        self.closing = False
        _HUBS.append(self)

    def subscribe(self, job_id: str) -> Subscriber:
        """A queue receiving `job_id`'s events from now on (starts the listener on first use)."""
        subscriber = Subscriber(job_id, closed=self.closing)
        with self._lock:
            self._subscribers.setdefault(job_id, set()).add(subscriber)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="event-hub", daemon=True)
                self._thread.start()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop queueing events for a closed stream."""
        with self._lock:
            subscribers = self._subscribers.get(subscriber.job_id)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del self._subscribers[subscriber.job_id]

    def close_all(self) -> None:
        """End every open stream now: its client resumes elsewhere with `Last-Event-ID`."""
        self.closing = True
        for subscriber in self._everyone():
            subscriber.close()

    @property
    def open_streams(self) -> int:
        """How many streams are subscribed now."""
        with self._lock:
            return sum(len(subscribers) for subscribers in self._subscribers.values())

    def _everyone(self) -> list[Subscriber]:
        with self._lock:
            return [s for subscribers in self._subscribers.values() for s in subscribers]

    def _run(self) -> None:
        backoff = 0.5
        while True:
            client = make_redis(self._redis_url)
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(EVENTS_CHANNEL)
                while True:
                    message = pubsub.get_message(timeout=5.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # (Re)subscribed: whatever was published meanwhile is in the logs.
                        backoff = 0.5
                        for subscriber in self._everyone():
                            subscriber.resync()
                    elif message["type"] == "message":
                        self._dispatch(message["data"])
            except (redis.RedisError, OSError) as exc:
                log.warning("event hub lost Redis (%s); reconnecting", type(exc).__name__)
            except Exception:
                log.exception("event hub failed; restarting it")
            finally:
                try:
                    pubsub.close()
                    client.close()
                except (redis.RedisError, OSError):
                    pass
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    def _dispatch(self, data: bytes) -> None:
        try:
            event = parse_published_event(data)
        except (ValueError, UnicodeDecodeError):
            log.warning("event hub: ignoring a malformed message")
            return
        with self._lock:
            subscribers = list(self._subscribers.get(event.job_id, ()))
        for subscriber in subscribers:
            subscriber.push(event)


def event_hub(app: Flask) -> EventHub:
    """The app's hub (one per process: each gunicorn worker builds its own app)."""
    hub = app.extensions.get(HUB_KEY)
    if hub is None:
        resources: Resources = farm()
        hub = EventHub(
            resources.settings.require_redis_url(), resources.settings.stream_max_per_process
        )
        app.extensions[HUB_KEY] = hub
    assert isinstance(hub, EventHub)
    return hub


# ---------------------------------------------------------------- one stream


def sse(event: str | None, event_id: str | None, data: str) -> str:
    """One Server-Sent Event (multi-line data split over `data:` lines)."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return "\n".join(lines) + "\n\n"


def _read_status(job_id: str) -> dict[str, Any]:
    """The status route's JSON for this job (a short read-only transaction; 404 raises)."""
    # The same domain read as the route, so a stream says exactly what a poll would.
    _job, body = read_status(farm(), current_principal(), job_id)
    return body.model_dump(mode="json")


def _read_result(job_id: str) -> str:
    """The JSON GET /v2/requests/{id} answers now: the result, FAILED, or the 410 problem."""
    base = farm().settings.public_base_url or request.url_root
    try:
        _job, body = read_result(farm(), current_principal(), job_id, base)
    except FarmError as exc:
        return problem(exc.status, exc.title, exc.message).get_data(as_text=True)
    return body.model_dump_json()


def _status_event(status: dict[str, Any]) -> StatusEvent:
    return StatusEvent(
        request_id=status["request_id"],
        status=status["status"],
        queue_position=status.get("queue_position"),
        eta_seconds=status.get("eta_seconds"),
        progress=Progress.model_validate(status["progress"]),
    )


def _finished(status: dict[str, Any]) -> bool:
    return status["status"] in ("COMPLETED", "FAILED")


@dataclass
class _Stream:
    """The state of one client's stream, advanced by the events it is sent."""

    job_id: str
    resources: Resources
    subscriber: Subscriber
    last_id: str
    status: StatusEvent
    sent_at: float = field(default_factory=time.monotonic)

    def send(self, event: str, event_id: str, data: str) -> str:
        self.last_id = event_id
        self.sent_at = time.monotonic()
        return sse(event, event_id, data)

    def send_status(self, event_id: str) -> str:
        return self.send("status", event_id, self.status.model_dump_json())

    def completed(self, event_id: str) -> str:
        return self.send("completed", event_id, _read_result(self.job_id))

    def _progress(self, data: dict[str, Any]) -> None:
        self.status.progress = Progress(
            images_done=data["images_done"],
            images=data["images"],
            step=data["step"],
            steps=data["steps"],
        )

    def apply(self, event: JobEvent) -> tuple[str | None, bool]:
        """The SSE text for one logged event (None: nothing to say) and whether it ends."""
        if event.kind == PROGRESS_EVENT:
            self._progress(event.data)
            body = ProgressEvent(request_id=self.job_id, **self.status.progress.model_dump())
            return self.send("progress", event.id, body.model_dump_json()), False
        if event.kind != STATE_EVENT:
            return None, False
        state = event.data.get("state")
        if state in _TERMINAL:
            return self.completed(event.id), True
        if state == JobState.RUNNING.value:
            if "progress" in event.data:
                self._progress(event.data["progress"])
            self.status.status = "PROCESSING"
            self.status.queue_position = None
            self.status.eta_seconds = None
            return self.send_status(event.id), False
        if state == JobState.QUEUED.value:
            # Back in line (its worker was lost): where in line needs the database (rare).
            status = _read_status(self.job_id)
            if _finished(status):
                return self.completed(event.id), True
            self.status = _status_event(status)
            return self.send_status(event.id), False
        return None, False

    def recheck(self) -> tuple[str | None, bool]:
        """Re-read the job's row: a new queue position, or an end Redis never announced."""
        status = _read_status(self.job_id)
        if _finished(status):
            return self.completed(self.last_id), True
        fresh = _status_event(status)
        if (fresh.status, fresh.queue_position) == (self.status.status, self.status.queue_position):
            return None, False
        self.status = fresh
        return self.send_status(self.last_id), False


@dataclass
class _Start:
    """What a stream sends first, decided before the response begins (so errors are JSON)."""

    chunks: list[str]
    done: bool


def _begin(
    job_id: str, resources: Resources, subscriber: Subscriber, resume: str | None
) -> tuple[_Stream, _Start]:
    """Replay after `resume` (if still logged), else a status snapshot; live from then on.

    The log is read before the job's row, so an event between the two is sent live
    (at worst a status said twice), never lost.
    """
    client = resources.redis
    replay: list[JobEvent] | None = None
    if resume is not None:
        replay = read_events_from(client, job_id, resume)
        if resume == "0-0" and not replay:
            replay = None  # nothing logged yet: a snapshot says where the request is
    tail = last_event_id(client, job_id)
    status = _read_status(job_id)  # the tenant check: another tenant's job is a 404
    stream = _Stream(job_id, resources, subscriber, tail, _status_event(status))
    chunks = [f"retry: {RETRY_MS}\n\n"]
    if replay is not None and resume is not None:
        # Resuming: everything the client missed, in order, then live (or the end).
        stream.last_id = resume
        for event in replay:
            text, done = stream.apply(event)
            if text is not None:
                chunks.append(text)
            if done:
                return stream, _Start(chunks, True)
        if _finished(status):  # ended, but the end never reached the log
            return stream, _Start([*chunks, stream.completed(stream.last_id)], True)
        return stream, _Start(chunks, False)
    if _finished(status):
        return stream, _Start([*chunks, stream.completed(tail)], True)
    return stream, _Start([*chunks, stream.send_status(tail)], False)


def _live(stream: _Stream, start: _Start) -> Iterator[str]:
    """The stream's body: what `_begin` decided, then live events until the job ends."""
    settings = stream.resources.settings
    client = stream.resources.redis
    yield from start.chunks
    if start.done:
        return
    next_recheck = time.monotonic() + settings.stream_recheck_s
    while True:
        next_heartbeat = stream.sent_at + settings.stream_heartbeat_s
        wait = min(next_heartbeat, next_recheck) - time.monotonic()
        events, resync = stream.subscriber.take(wait)
        if stream.subscriber.closed:
            return  # the server is stopping: the client resumes with Last-Event-ID
        if resync:
            try:
                events = read_events_after(client, stream.job_id, stream.last_id)
            except redis.RedisError as exc:
                log.warning("stream of %s: log not read (%s)", stream.job_id, type(exc).__name__)
        last = event_position(stream.last_id)
        for event in events:
            if event.position <= last:  # already sent (replayed, or re-read)
                continue
            text, done = stream.apply(event)
            last = event.position
            if text is not None:
                yield text
            if done:
                return
        now = time.monotonic()
        if now >= next_recheck:
            next_recheck = now + settings.stream_recheck_s
            try:
                text, done = stream.recheck()
            except (redis.RedisError, FarmError) as exc:
                log.warning("stream of %s: not rechecked (%s)", stream.job_id, type(exc).__name__)
                text, done = None, False
            if text is not None:
                yield text
            if done:
                return
        if time.monotonic() - stream.sent_at >= settings.stream_heartbeat_s:
            stream.sent_at = time.monotonic()
            yield ": keep-alive\n\n"


def _event_id(given: str, name: str) -> str:
    """A resume point as the log reads it ("0" is "0-0"); a 400 naming `name` if malformed."""
    if re.fullmatch(EVENT_ID_PATTERN, given) is None:
        raise InvalidParams.single(name, "pattern", "must be an event id this stream sent, or 0")
    return FROM_THE_START if given == "0" else given


def _resume_id(query: EventsQuery) -> str | None:
    """Where to resume: the `Last-Event-ID` header, else the query parameter."""
    header = request.headers.get(LAST_EVENT_ID_HEADER)
    if header is not None:
        return _event_id(header.strip(), LAST_EVENT_ID_HEADER)
    if query.last_event_id is not None:
        return _event_id(query.last_event_id, "last_event_id")
    return None


@bp.get("/v2/requests/<job_id>/events")
@operation(
    summary="A request's status, progress and result as Server-Sent Events",
    description="Events: `status` (data: StatusEvent; QUEUED with queue position and ETA, "
    "PROCESSING, ...), `progress` (data: ProgressEvent; step of steps, images done) and, "
    "last, `completed` (data: the same JSON as GET /v2/requests/{id}, COMPLETED or FAILED), "
    "after which the server closes the stream; a request already finished answers "
    "`completed` at once. Every event has an `id`; `Last-Event-ID` (or `last_event_id`) "
    "resumes after it. A `: keep-alive` comment comes every 15 s of silence.",
    response_media_types={"text/event-stream": None},
    response_description="The event stream",
    errors=(400, 401, 404, 503),
    query=EventsQuery,
    headers=(LAST_EVENT_ID,),
    tags=("requests",),
    operation_id="streamRequestEvents",
)
@authenticated
def job_events(job_id: str) -> Response:
    """Stream a request's events until its final one."""
    resume = _resume_id(parse_query(EventsQuery))
    resources = farm()
    hub = event_hub(current_app)
    if not hub.slots.acquire(blocking=False):
        raise ServiceUnavailable("This server has as many event streams open as it serves")
    subscriber = hub.subscribe(job_id)

    def close() -> None:
        hub.unsubscribe(subscriber)
        hub.slots.release()

    try:
        stream, start = _begin(job_id, resources, subscriber, resume)
    except BaseException:
        close()
        raise
    response = Response(stream_with_context(_live(stream, start)), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass events on at once
    response.call_on_close(close)
    return response
