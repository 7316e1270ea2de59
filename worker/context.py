"""The worker context: what a worker process holds for its whole life.

Its name, settings, database sessions, Redis client, result storage and loaded
renderer; the job on its device; its busy meter; and its post-processing thread,
which outlives any one job (drained by `close` at shutdown).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import redis
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import Settings
from shared.storage import ResultStorage
from worker.busy import BusyMeter
from worker.pipeline import KolorsRenderer
from worker.post import PostProcessor


@dataclass
class WorkerContext:
    """What a worker process holds for its whole life."""

    name: str
    settings: Settings
    sessions: sessionmaker[Session]
    redis: redis.Redis
    storage: ResultStorage
    renderer: KolorsRenderer
    current_job: str | None = None
    busy: BusyMeter = field(default_factory=BusyMeter)
    _post: PostProcessor | None = field(default=None, init=False, repr=False)
    _post_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def post(self) -> PostProcessor:
        """The post-processing thread's queue (created on first use)."""
        with self._post_lock:
            if self._post is None:
                self._post = PostProcessor(self)
            return self._post

    def close(self) -> int:
        """Wait until every queued image is stored and recorded (worker shutdown); how many."""
        return self.post.drain()
