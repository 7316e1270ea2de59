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

PROGRESS_TTL_S: Final = 24 * 3600
_PREFIX: Final = "kolors-farm"


def job_channel(job_id: str) -> str:
    """The pub/sub channel that announces a job's end."""
    return f"{_PREFIX}:job:{job_id}:done"


def progress_key(job_id: str) -> str:
    """The hash holding a running job's step progress."""
    return f"{_PREFIX}:job:{job_id}:progress"


def make_redis(url: str) -> redis.Redis:
    """A Redis client with timeouts, so a stalled server cannot hang a request forever."""
    return redis.Redis.from_url(
        url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
    )


def announce_job_finished(client: redis.Redis, job_id: str, state: str) -> None:
    """Tell waiters (the synchronous route) that a job reached a terminal state."""
    client.publish(job_channel(job_id), state)


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
WORKERS_KEY: Final = f"{_PREFIX}:workers"
WORKERS_INFO_KEY: Final = f"{_PREFIX}:workers:info"


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
SETTLING_KEY: Final = f"{_PREFIX}:settling"


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
    return f"{_PREFIX}:job:{job_id}:cancel"


def request_cancel(client: redis.Redis, job_id: str) -> None:
    """Ask the worker rendering `job_id` to stop at its next step."""
    client.set(cancel_key(job_id), "1", ex=PROGRESS_TTL_S)


def is_cancel_requested(client: redis.Redis, job_id: str) -> bool:
    """Whether a cancel was asked for `job_id`."""
    return bool(client.exists(cancel_key(job_id)))


DISPATCH_WAKE_KEY: Final = f"{_PREFIX}:dispatch:wake"
DISPATCH_LOCK_KEY: Final = f"{_PREFIX}:dispatch:leader"
SPEED_KEY: Final = f"{_PREFIX}:speed"


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
