"""Serve the API with gunicorn's threaded workers, so synchronous waits never block others.

Event streams (GET /v2/requests/{id}/events) hold a thread each for as long as they
are open, so each process gets `stream_max_per_process` threads on top of `threads`
and admits at most that many streams (a 503 beyond): however many streams are open,
the other routes keep their `threads`. An idle stream's thread waits on a condition
(no CPU, no Redis or database connection) and costs only its stack's touched pages.
Python threads are created as the pool needs them, so unused stream threads cost
nothing. A gevent worker would also do, but it means a new dependency and monkey-
patching every driver (psycopg, redis, boto3); threads keep the stack as it is.

A request gunicorn refuses before the app sees it (a request line or header over
the limits below, a malformed request) gets the same problem+json body as the
app's own errors, not gunicorn's HTML page: `ProblemWorker`.
"""

from __future__ import annotations

import json
import re
import signal
from types import FrameType
from typing import Any, Final

from flask import Flask
from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from api.errors import problem_document
from api.metrics import mark_process_dead, prepare_multiprocess_dir
from api.spec import PROBLEM_MEDIA_TYPE
from shared.settings import Settings

# gunicorn's largest request line (method, path with query, version): signed image
# links and cursors fit with room to spare; a longer one is a 414.
REQUEST_LINE_LIMIT: Final = 8190
# One header (name and value); an API key or an Idempotency-Key is far shorter: a 431.
HEADER_FIELD_LIMIT: Final = 8190
# Headers in one request; more is a 431.
HEADER_FIELDS_LIMIT: Final = 100
# What each status gunicorn itself answers says, in the app's words.
GUNICORN_DETAILS: Final = {
    400: "The request is not valid HTTP (its request line or a header is malformed)",
    403: "Request forbidden",
    414: f"The request line (method, path and query) is longer than {REQUEST_LINE_LIMIT} bytes",
    417: "Expectation failed",
    431: f"A request header is longer than {HEADER_FIELD_LIMIT} bytes, or there are "
    f"more than {HEADER_FIELDS_LIMIT} of them",
    500: "Internal server error",
    501: "Not implemented",
}
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ([^\r\n]*)")


class _ErrorPage:
    """Stands in for the client's socket while gunicorn writes its error page, to keep it."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        """Non-blocking, so gunicorn's writer leaves the blocking mode alone."""
        return 0.0

    def sendall(self, data: bytes) -> None:
        """Keep what gunicorn would have sent."""
        self.data += data


def problem_answer(status: int, reason: str) -> bytes:
    """A whole HTTP response with the problem+json body of a request gunicorn refused."""
    detail = GUNICORN_DETAILS.get(status, reason)
    body = json.dumps(problem_document(status, reason, detail)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        f"Content-Type: {PROBLEM_MEDIA_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class ProblemWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's threaded worker, answering the requests it refuses with problem+json."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Answer as gunicorn does (status, logs, access log), but with a problem+json body."""
        # gunicorn keeps deciding the status and logging; only the page it writes changes.
        page = _ErrorPage()
        super().handle_error(req, page, addr, exc)
        match = _STATUS_LINE.match(page.data)
        status, reason = (int(match[1]), match[2].decode("latin-1")) if match else (500, "Error")
        try:
            util.write_nonblock(client, problem_answer(status, reason))
        except Exception:
            self.log.debug("Failed to send error message.")


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
            "worker_class": ProblemWorker,
            "threads": threads + settings.stream_max_per_process,
            # Connections a process holds at once: busy threads plus idle keep-alives.
            "worker_connections": threads + settings.stream_max_per_process + 1000,
            # gthread workers heartbeat from their main loop; this only bounds a stuck process.
            "timeout": int(settings.sync_timeout_s) + 60,
            "graceful_timeout": 10,
            "limit_request_line": REQUEST_LINE_LIMIT,
            "limit_request_field_size": HEADER_FIELD_LIMIT,
            "limit_request_fields": HEADER_FIELDS_LIMIT,
            "accesslog": "-",
            "access_log_format": '%(h)s "%(r)s" %(s)s %(b)s %(M)sms',
            "loglevel": "info",
            "child_exit": _child_exit,
            "post_worker_init": _post_worker_init,
        },
    ).run()
