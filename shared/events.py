"""Hot, ephemeral job state in Redis: completion notices, step progress, worker heartbeats.

SQL stays the source of truth; everything here may be lost and is rebuilt or
re-read from the database.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
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


def announce_job_finished(client: redis.Redis, job_id: str, state: str) -> None:
    """Tell waiters (the synchronous route, event streams) that a job reached a terminal state."""
    with client.pipeline(transaction=False) as pipe:
        pipe.publish(job_channel(job_id), state)
        _append_event(pipe, job_id, STATE_EVENT, {"state": state}, final=True)
        pipe.execute()


# ---------------------------------------------------------------- the progress stream
#
# Every event a job's stream serves is appended to a short Redis Stream per job (its
# entry ids are the SSE event ids, so `Last-Event-ID` resumes exactly) and, in the same
# script, published on ONE farm-wide channel that each API process reads with a single
# subscription and fans out to its open streams. So an open stream costs its API process
# a thread and a queue, never a Redis or database connection of its own.

EVENTS_CHANNEL: Final = f"{KEY_PREFIX}:job-events"
STATE_EVENT: Final = "state"  # data {"state": JobState value}
PROGRESS_EVENT: Final = "progress"  # data: the Progress fields
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


def publish_job_state(
    client: redis.Redis, job_id: str, state: str, progress: Progress | None = None
) -> None:
    """Log and publish a live job's new state: RUNNING, or QUEUED again (ends: announce)."""
    data: dict[str, Any] = {"state": state}
    if progress is not None:
        data["progress"] = asdict(progress)
    with client.pipeline(transaction=False) as pipe:
        _append_event(pipe, job_id, STATE_EVENT, data)
        pipe.execute()


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
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
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
class Progress:
    """Where a running job is: step of steps of the current image, images done."""

    attempt: int
    step: int
    steps: int
    images_done: int
    images: int
    updated_at: float


def write_progress(client: redis.Redis, job_id: str, progress: Progress) -> None:
    """Store a job's progress (callers throttle)."""
    key = progress_key(job_id)
    client.hset(key, mapping={k: str(v) for k, v in asdict(progress).items()})
    client.expire(key, PROGRESS_TTL_S)


def publish_progress(client: redis.Redis, job_id: str, progress: Progress) -> None:
    """Store a job's progress for the status route and publish it to its streams (one trip)."""
    fields = asdict(progress)
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(progress_key(job_id), mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(progress_key(job_id), PROGRESS_TTL_S)
        _append_event(pipe, job_id, PROGRESS_EVENT, fields)
        pipe.execute()


def read_progress(client: redis.Redis, job_id: str) -> Progress | None:
    """A job's last reported progress, if any."""
    raw: dict[bytes, bytes] = client.hgetall(progress_key(job_id))  # type: ignore[assignment]
    if not raw:
        return None
    values = {k.decode(): v.decode() for k, v in raw.items()}
    return Progress(
        attempt=int(values["attempt"]),
        step=int(values["step"]),
        steps=int(values["steps"]),
        images_done=int(values["images_done"]),
        images=int(values["images"]),
        updated_at=float(values["updated_at"]),
    )


# Live workers: a set scored by when each heartbeat expires, and a hash of what each
# said last. Reading them is one round trip, whatever else the keyspace holds (a key
# per job's progress, for instance).
WORKERS_KEY: Final = f"{KEY_PREFIX}:workers"
WORKERS_INFO_KEY: Final = f"{KEY_PREFIX}:workers:info"


def record_heartbeat(client: redis.Redis, name: str, info: dict[str, Any], ttl_s: float) -> None:
    """Mark a worker alive for `ttl_s` seconds with a little about it."""
    now = time.time()
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(WORKERS_INFO_KEY, name, json.dumps(info))
        pipe.zadd(WORKERS_KEY, {name: now + ttl_s})
        pipe.zrangebyscore(WORKERS_KEY, "-inf", now - 3600)  # gone for an hour
        gone: list[bytes] = pipe.execute()[-1]
    if gone:
        forget_workers(client, [member.decode() for member in gone])


# Per worker, the jobs it has finished rendering that are still being stored and
# recorded: RUNNING in SQL, but the worker's device is already free for the next job.
SETTLING_KEY: Final = f"{KEY_PREFIX}:settling"


def count_settling(client: redis.Redis, name: str, delta: int) -> None:
    """A worker's job finished rendering (+1), or finished settling (-1)."""
    client.hincrby(SETTLING_KEY, name, delta)


def reset_settling(client: redis.Redis, name: str) -> None:
    """A starting worker has nothing settling (whatever a dead one left is its lease's now)."""
    client.hdel(SETTLING_KEY, name)


def settling_jobs(client: redis.Redis, names: Iterable[str]) -> int:
    """How many jobs of these workers are settling (their devices free for the next)."""
    wanted = list(names)
    if not wanted:
        return 0
    counts: list[bytes | None] = client.hmget(SETTLING_KEY, wanted)  # type: ignore[assignment]
    return sum(max(0, int(count)) for count in counts if count is not None)


def forget_worker(client: redis.Redis, name: str) -> None:
    """Remove a stopping worker at once instead of when its heartbeat expires."""
    forget_workers(client, [name])


def forget_workers(client: redis.Redis, names: list[str]) -> None:
    """Remove workers from the live set and their status and speed."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hdel(WORKERS_INFO_KEY, *names)
        pipe.zrem(WORKERS_KEY, *names)
        pipe.hdel(SPEED_KEY, *names)
        pipe.hdel(SETTLING_KEY, *names)
        pipe.execute()


def _live(names: list[bytes], infos: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    return {name.decode(): json.loads(infos[name]) for name in names if name in infos}


def live_workers(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Workers whose heartbeat has not expired, by name, with what they said last."""
    return fleet(client)[0]


def fleet(client: redis.Redis) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """The live workers and the measured render speeds of those that have rendered.

    One round trip.
    """
    with client.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(WORKERS_KEY, time.time(), "+inf")
        pipe.hgetall(WORKERS_INFO_KEY)
        pipe.hgetall(SPEED_KEY)
        names, infos, speeds = pipe.execute()
    workers = _live(names, infos)
    return workers, {
        name: float(speeds[name.encode()]) for name in workers if name.encode() in speeds
    }


def cancel_key(job_id: str) -> str:
    """The flag a running job's worker checks at every step."""
    return f"{KEY_PREFIX}:job:{job_id}:cancel"


def request_cancel(client: redis.Redis, job_id: str) -> None:
    """Ask the worker rendering `job_id` to stop at its next step."""
    client.set(cancel_key(job_id), "1", ex=PROGRESS_TTL_S)


def is_cancel_requested(client: redis.Redis, job_id: str) -> bool:
    """Whether a cancel was asked for `job_id`."""
    return bool(client.exists(cancel_key(job_id)))


DISPATCH_WAKE_KEY: Final = f"{KEY_PREFIX}:dispatch:wake"
DISPATCH_LOCK_KEY: Final = f"{KEY_PREFIX}:dispatch:leader"
SPEED_KEY: Final = f"{KEY_PREFIX}:speed"


def wake_dispatcher(client: redis.Redis) -> None:
    """Tell the dispatcher there is work now, instead of at its next tick."""
    with client.pipeline(transaction=False) as pipe:
        pipe.lpush(DISPATCH_WAKE_KEY, "1")
        pipe.ltrim(DISPATCH_WAKE_KEY, 0, 0)
        pipe.execute()


def wait_for_wake(client: redis.Redis, timeout_s: float) -> bool:
    """Block until woken or `timeout_s` passes (keep it under the socket timeout)."""
    woken = client.blpop([DISPATCH_WAKE_KEY], timeout=timeout_s)
    return woken is not None


# Render speed: an exponentially weighted mean of seconds per work unit (one
# 1024x1024 image at one step), per worker; the ETA divides queued work by it.
_SPEED_WEIGHT: Final = 0.3


def record_render_speed(client: redis.Redis, worker: str, seconds_per_unit: float) -> None:
    """Fold one measured render into the worker's speed."""
    previous = client.hget(SPEED_KEY, worker)
    value = seconds_per_unit
    if previous is not None:
        value = _SPEED_WEIGHT * seconds_per_unit + (1 - _SPEED_WEIGHT) * float(previous)
    client.hset(SPEED_KEY, worker, f"{value:.6g}")
