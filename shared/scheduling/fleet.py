"""The fleet's live state in Redis: heartbeats, jobs settling, render speeds, dispatcher wake-ups.

All of it may be lost: a heartbeat is re-sent every few seconds, a speed is measured
again at the next render, and the dispatcher also ticks on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

import redis

from shared.redis_client import KEY_PREFIX

# Live workers: a set scored by when each heartbeat expires, and a hash of what each
# said last. Reading them is one round trip, whatever else the keyspace holds (a key
# per job's progress, for instance).
WORKERS_KEY: Final = f"{KEY_PREFIX}:workers"


WORKERS_INFO_KEY: Final = f"{KEY_PREFIX}:workers:info"


# Expiries are on Redis's clock (TIME), not the hosts': a worker whose clock runs fast
# or slow can neither look alive after it died nor dead while it beats.
_NOW_LUA: Final = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6 "
_HEARTBEAT_SCRIPT: Final = (
    _NOW_LUA
    + """
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 3600)
"""
)
_LIVE_SCRIPT: Final = _NOW_LUA + "return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')"
_LAPSED_SCRIPT: Final = _NOW_LUA + "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)"


def record_heartbeat(client: redis.Redis, name: str, info: dict[str, Any], ttl_s: float) -> None:
    """Mark a worker alive for `ttl_s` seconds (on Redis's clock) with a little about it."""
    keys = (WORKERS_KEY, WORKERS_INFO_KEY)
    gone: list[bytes] = client.eval(_HEARTBEAT_SCRIPT, 2, *keys, name, json.dumps(info), ttl_s)
    if gone:  # gone for an hour
        forget_workers(client, [member.decode() for member in gone])


def lapsed_workers(client: redis.Redis) -> set[str]:
    """Workers whose heartbeat lapsed without a goodbye (a crash, a cut-off host).

    A worker that stops cleanly is forgotten at once, and one gone for an hour is
    forgotten too; a Redis restarted empty knows no lapsed worker at all.
    """
    lapsed: list[bytes] = client.eval(_LAPSED_SCRIPT, 1, WORKERS_KEY)
    return {name.decode() for name in lapsed}


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
        pipe.eval(_LIVE_SCRIPT, 1, WORKERS_KEY)
        pipe.hgetall(WORKERS_INFO_KEY)
        pipe.hgetall(SPEED_KEY)
        names, infos, speeds = pipe.execute()
    workers = _live(names, infos)
    return workers, {
        name: float(speeds[name.encode()]) for name in workers if name.encode() in speeds
    }


DISPATCH_WAKE_KEY: Final = f"{KEY_PREFIX}:dispatch:wake"


DISPATCH_LOCK_KEY: Final = f"{KEY_PREFIX}:dispatch:leader"


SPEED_KEY: Final = f"{KEY_PREFIX}:speed"


def wake_dispatcher(client: redis.Redis) -> None:
    """Tell the dispatcher there is work now, instead of at its next tick."""
    with client.pipeline(transaction=False) as pipe:
        queue_wake(pipe)
        pipe.execute()


def queue_wake(pipe: Any) -> None:
    """Queue the dispatcher's wake-up on a pipeline (see `wake_dispatcher`)."""
    pipe.lpush(DISPATCH_WAKE_KEY, "1")
    pipe.ltrim(DISPATCH_WAKE_KEY, 0, 0)


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
