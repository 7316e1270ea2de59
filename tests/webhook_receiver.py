"""A real HTTP receiver on loopback for webhook tests: records every request, answers a script.

Each path has a script of answers, used in order (the last one repeats): a status
code, or "hang" (hold the connection until the receiver stops or is released).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from control.processes import free_port


@dataclass(frozen=True)
class Received:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """The server's state: scripts by path, what arrived, and a gate for hanging answers."""

    port: int
    scripts: dict[str, list[str]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        """The URL of `path` on this receiver."""
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *answers: str) -> str:
        """Answer `path` with these, in order (the last repeats); its URL."""
        with self.lock:
            self.scripts[path] = list(answers)
        return self.url(path)

    def next_answer(self, path: str) -> str:
        """The answer to give now."""
        with self.lock:
            answers = self.scripts.get(path, ["200"])
            return answers.pop(0) if len(answers) > 1 else answers[0]

    def at(self, path: str) -> list[Received]:
        """The requests `path` got so far."""
        with self.lock:
            return [r for r in self.received if r.path == path]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            with receiver.lock:
                receiver.received.append(
                    Received(self.path, dict(self.headers.items()), body, time.monotonic())
                )
            answer = receiver.next_answer(self.path)
            if answer == "hang":
                receiver.release.wait(60)
                return
            status = int(answer)
            self.send_response(status)
            self.send_header("content-type", "text/plain")
            payload = b"x" * 10_000 if status >= 400 else b"ok"
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def start(receiver: Receiver) -> None:
    """Listen on the receiver's port (again, after a stop)."""
    server = ThreadingHTTPServer(("127.0.0.1", receiver.port), _handler(receiver))
    server.daemon_threads = True
    receiver.server = server
    threading.Thread(target=server.serve_forever, daemon=True).start()


def stop(receiver: Receiver) -> None:
    """Stop listening (hanging answers are released)."""
    if receiver.server is not None:
        receiver.release.set()
        receiver.server.shutdown()
        receiver.server.server_close()
        receiver.server = None
        receiver.release = threading.Event()


@contextmanager
def running_receiver(port: int | None = None) -> Iterator[Receiver]:
    """A receiver listening on loopback until the block ends."""
    receiver = Receiver(port=port or free_port())
    start(receiver)
    try:
        yield receiver
    finally:
        stop(receiver)
