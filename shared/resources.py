"""Wire the settings into the long-lived clients every process uses: the one place that does.

The API, the workers and the dispatcher each call `open_resources` once at
start (after a fork, for gunicorn) and close it when they stop. Wiring the
session factory includes its after-commit publisher (`shared.jobs.effects`), so
this module sits above every package of `shared` rather than beside the platform
modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_session_factory
from shared.jobs.effects import install_publisher
from shared.redis_client import make_redis
from shared.settings import Settings
from shared.storage import ResultStorage, make_storage


@dataclass
class Resources:
    """The database engine and sessions, Redis and result storage of one process."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    redis: redis.Redis
    storage: ResultStorage

    def __post_init__(self) -> None:
        # Every transaction's effects (announcements, metrics, wake-ups) go to this Redis.
        install_publisher(self.sessions, self.redis)

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()
        self.redis.close()


def open_resources(settings: Settings) -> Resources:
    """Build the database engine, session factory, Redis client and storage from `settings`."""
    engine = make_engine(settings.resolved_database_url)
    return Resources(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        redis=make_redis(settings.require_redis_url()),
        storage=make_storage(settings.resolved_storage_url),
    )
