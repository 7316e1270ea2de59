"""The Redis client every process uses, and the prefix of every key the farm keeps there."""

from __future__ import annotations

from typing import Final

import redis

KEY_PREFIX: Final = "kolors-farm"


# Connections a process's Redis client opens at most. A burst of more concurrent
# commands (hundreds of event streams opening at once) waits for a free one, up to
# REDIS_POOL_WAIT_S, instead of failing at once as redis-py's default pool does.
REDIS_POOL_SIZE: Final = 100
REDIS_POOL_WAIT_S: Final = 10.0


def make_redis(url: str) -> redis.Redis:
    """A Redis client with timeouts, so a stalled server cannot hang a request forever."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_POOL_SIZE,
        timeout=REDIS_POOL_WAIT_S,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)
