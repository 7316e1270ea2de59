"""Hot, ephemeral job state in Redis: completion notices, step progress, worker heartbeats.

SQL stays the source of truth; everything here may be lost and is rebuilt or
re-read from the database.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import redis

from shared.redis_client import KEY_PREFIX

PROGRESS_TTL_S: Final = 24 * 3600


def job_channel(job_id: str) -> str:
    """The pub/sub channel that announces a job's end."""
    return f"{KEY_PREFIX}:job:{job_id}:done"


def progress_key(job_id: str) -> str:
    """The hash holding a running job's step progress."""
    return f"{KEY_PREFIX}:job:{job_id}:progress"


def queue_job_ended(pipe: Any, job_id: str, state: str) -> None:
    """Queue on a pipeline the announcement that a job reached a terminal state (its waiters)."""
    pipe.publish(job_channel(job_id), state)
    _append_event(pipe, job_id, STATE_EVENT, {"state": state}, final=True)


# ---------------------------------------------------------------- the progress stream
#
# Every event a job's stream serves is appended to a short Redis Stream per job (its
# entry ids are the SSE event ids, so `Last-Event-ID` resumes exactly) and, in the same
# script, published on ONE farm-wide channel that each API process reads with a single
# subscription and fans out to its open streams. So an open stream costs its API process
# a thread and a queue, never a Redis or database connection of its own.

EVENTS_CHANNEL: Final = f"{KEY_PREFIX}:job-events"
STATE_EVENT: Final = "state"  # data {"state": JobState value}
PROGRESS_EVENT: Final = "progress"  # data: the StepProgress fields
# Entries kept per job (approximately: Redis trims whole nodes). Progress is throttled
# (`progress_interval_s`), so this spans minutes of one render; a client further behind
# resumes from a fresh status snapshot instead.
EVENT_LOG_MAXLEN: Final = 1000
EVENT_LOG_TTL_S: Final = 3600
# Once a job ended its stream is answered from the database; the log lingers briefly.
ENDED_EVENT_LOG_TTL_S: Final = 300

_APPEND_SCRIPT: Final = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                      'kind', ARGV[2], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6] .. ' ' .. id .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
return id
"""


def event_log_key(job_id: str) -> str:
    """The capped Redis Stream holding a job's recent events."""
    return f"{KEY_PREFIX}:job:{job_id}:events"


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event log: its id (a Redis Stream entry id), kind and data."""

    job_id: str
    id: str
    kind: str
    data: dict[str, Any]

    @property
    def position(self) -> tuple[int, int]:
        """The id as a comparable pair."""
        return event_position(self.id)


def event_position(event_id: str) -> tuple[int, int]:
    """A Redis Stream entry id ("ms-seq") as a comparable pair; ValueError if malformed."""
    millis, _, seq = event_id.partition("-")
    if not (millis.isdigit() and seq.isdigit()) or len(millis) > 20 or len(seq) > 20:
        raise ValueError(f"not an event id: {event_id!r}")
    return int(millis), int(seq)


def _append_event(
    pipe: Any, job_id: str, kind: str, data: dict[str, Any], final: bool = False
) -> None:
    """Queue, on a pipeline, the script that logs one event and publishes it."""
    ttl = ENDED_EVENT_LOG_TTL_S if final else EVENT_LOG_TTL_S
    payload = json.dumps(data, separators=(",", ":"))
    args = [EVENT_LOG_MAXLEN, kind, payload, ttl, EVENTS_CHANNEL, job_id]
    pipe.eval(_APPEND_SCRIPT, 1, event_log_key(job_id), *args)


def queue_job_state(
    pipe: Any, job_id: str, state: str, progress: StepProgress | None = None
) -> None:
    """Queue on a pipeline the event of a live job's new state: RUNNING, or QUEUED again."""
    data: dict[str, Any] = {"state": state}
    if progress is not None:
        data["progress"] = asdict(progress)
    _append_event(pipe, job_id, STATE_EVENT, data)


def parse_published_event(message: bytes) -> JobEvent:
    """A message of `EVENTS_CHANNEL` as the event it announces."""
    job_id, event_id, kind, data = message.decode().split(" ", 3)
    return JobEvent(job_id, event_id, kind, json.loads(data))


def _entry(job_id: str, entry: Any) -> JobEvent:
    entry_id, fields = entry
    return JobEvent(
        job_id, entry_id.decode(), fields[b"kind"].decode(), json.loads(fields[b"data"])
    )


def read_events_after(client: redis.Redis, job_id: str, after: str) -> list[JobEvent]:
    """The logged events of a job after `after` ("0-0": all), oldest first."""
    entries: Any = client.xrange(event_log_key(job_id), min=f"({after}", max="+")
    return [_entry(job_id, entry) for entry in entries]


def read_events_from(client: redis.Redis, job_id: str, start: str) -> list[JobEvent] | None:
    """The logged events after `start`, or None if `start` is no longer (or never was) logged.

    One round trip: the range starts at `start` itself, which must come back first.
    """
    if start == "0-0":
        return read_events_after(client, job_id, start)
    entries: Any = client.xrange(event_log_key(job_id), min=start, max="+")
    events = [_entry(job_id, entry) for entry in entries]
    if not events or events[0].id != start:
        return None
    return events[1:]


def last_event_id(client: redis.Redis, job_id: str) -> str:
    """The id of a job's newest logged event ("0-0" when none)."""
    entries: Any = client.xrevrange(event_log_key(job_id), max="+", min="-", count=1)
    return entries[0][0].decode() if entries else "0-0"


def wait_for_job(
    client: redis.Redis, job_id: str, is_finished: Callable[[], bool], timeout_s: float
) -> bool:
    """Block until the job ends or `timeout_s` passes; True if it ended.

    Subscribes before asking `is_finished` (a short DB read), so an end that
    happens between the two is never missed.
    """
    deadline = time.monotonic() + timeout_s
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(job_channel(job_id))
        if is_finished():
            return True
        while (remaining := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=min(remaining, 5.0))
            if message is not None and message["type"] == "message":
                return True
            # A notice lost to a Redis restart must not hang the caller until the deadline.
            if message is None and is_finished():
                return True
        return is_finished()
    except redis.RedisError:
        # Redis is away but the job goes on: read its row once a second instead.
        while (remaining := deadline - time.monotonic()) > 0:
            if is_finished():
                return True
            time.sleep(min(1.0, remaining))
        return is_finished()
    finally:
        with contextlib.suppress(redis.RedisError):
            pubsub.close()


@dataclass(frozen=True)
class StepProgress:
    """Where a running job is (its Redis record): step of steps of this image, images done."""

    attempt: int
    step: int
    steps: int
    images_done: int
    images: int
    updated_at: float


def write_progress(client: redis.Redis, job_id: str, progress: StepProgress) -> None:
    """Store a job's progress (callers throttle)."""
    key = progress_key(job_id)
    client.hset(key, mapping={k: str(v) for k, v in asdict(progress).items()})
    client.expire(key, PROGRESS_TTL_S)


def publish_progress(client: redis.Redis, job_id: str, progress: StepProgress) -> None:
    """Store a job's progress for the status route and publish it to its streams (one trip)."""
    fields = asdict(progress)
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(progress_key(job_id), mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(progress_key(job_id), PROGRESS_TTL_S)
        _append_event(pipe, job_id, PROGRESS_EVENT, fields)
        pipe.execute()


def read_progress(client: redis.Redis, job_id: str) -> StepProgress | None:
    """A job's last reported progress, if any."""
    raw: dict[bytes, bytes] = client.hgetall(progress_key(job_id))  # type: ignore[assignment]
    if not raw:
        return None
    values = {k.decode(): v.decode() for k, v in raw.items()}
    return StepProgress(
        attempt=int(values["attempt"]),
        step=int(values["step"]),
        steps=int(values["steps"]),
        images_done=int(values["images_done"]),
        images=int(values["images"]),
        updated_at=float(values["updated_at"]),
    )


def cancel_key(job_id: str) -> str:
    """The flag a running job's worker checks at every step."""
    return f"{KEY_PREFIX}:job:{job_id}:cancel"


def request_cancel(client: redis.Redis, job_id: str) -> None:
    """Ask the worker rendering `job_id` to stop at its next step."""
    queue_cancel_request(client, job_id)


def queue_cancel_request(pipe: Any, job_id: str) -> None:
    """Set the cancel flag of `job_id`, on a client or a pipeline."""
    pipe.set(cancel_key(job_id), "1", ex=PROGRESS_TTL_S)


def is_cancel_requested(client: redis.Redis, job_id: str) -> bool:
    """Whether a cancel was asked for `job_id`."""
    return bool(client.exists(cancel_key(job_id)))
