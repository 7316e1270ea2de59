"""Serve the API with gunicorn's threaded workers, so synchronous waits never block others.

Event streams (GET /v2/requests/{id}/events) hold a thread each for as long as they
are open, so each process gets `stream_max_per_process` threads on top of `threads`
and admits at most that many streams (a 503 beyond): however many streams are open,
the other routes keep their `threads`. An idle stream's thread waits on a condition
(no CPU, no Redis or database connection) and costs only its stack's touched pages.
Python threads are created as the pool needs them, so unused stream threads cost
nothing. A gevent worker would also do, but it means a new dependency and monkey-
patching every driver (psycopg, redis, boto3); threads keep the stack as it is.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from api.metrics import mark_process_dead, prepare_multiprocess_dir
from shared.settings import Settings


class _GunicornApp(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self._settings = settings
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        # Built in each worker process after the fork: no shared connections.
        from api.app import create_app

        return create_app(self._settings)


def _child_exit(_server: Any, worker: Any) -> None:
    mark_process_dead(worker.pid)


def _post_worker_init(_worker: Any) -> None:
    """On SIGTERM, end the open event streams at once, so they never hold a restart up.

    Their clients resume with `Last-Event-ID` on whichever process answers next.
    """
    from api.stream import close_streams

    graceful = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> None:
        if callable(graceful):
            graceful(signum, frame)
        close_streams()

    signal.signal(signal.SIGTERM, on_term)


def serve(settings: Settings, host: str, port: int, processes: int, threads: int) -> None:
    """Run the API until SIGTERM/SIGINT."""
    # Before gunicorn forks: its processes share their HTTP metrics through these files.
    # One directory per port, so two API servers on one data dir do not mix theirs.
    prepare_multiprocess_dir(settings.data_dir / "metrics" / f"api-{port}")
    _GunicornApp(
        settings,
        {
            "bind": f"{host}:{port}",
            "workers": processes,
            "worker_class": "gthread",
            "threads": threads + settings.stream_max_per_process,
            # Connections a process holds at once: busy threads plus idle keep-alives.
            "worker_connections": threads + settings.stream_max_per_process + 1000,
            # gthread workers heartbeat from their main loop; this only bounds a stuck process.
            "timeout": int(settings.sync_timeout_s) + 60,
            "graceful_timeout": 10,
            "accesslog": "-",
            "access_log_format": '%(h)s "%(r)s" %(s)s %(b)s %(M)sms',
            "loglevel": "info",
            "child_exit": _child_exit,
            "post_worker_init": _post_worker_init,
        },
    ).run()
