"""Child processes: start, watch, restart with backoff, stop. The one owner of that job.

`kolors-farm up`, `kolors-farm workers` and the tests all start their children
through `Supervisor`. A child that exits is started again after a delay that
doubles with each quick failure (1 s up to 60 s) and resets once it has run for
a minute, so a crash loop (a broken model path, a sick GPU) cannot spin the
CPU, while a one-off crash costs a second. A supervisor may give up on a child
that keeps dying before it ever ran that long (`give_up_after`).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger("kolors_farm.processes")

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
HEALTHY_AFTER_S = 60.0


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ChildSpec:
    """How to run one child: its name, command line and environment."""

    name: str
    argv: list[str]
    env: dict[str, str]
    # Where stdout and stderr go (appended); None: this process's own.
    log_path: Path | None = None
    # Stopped after every other child (a server the others need to shut down cleanly).
    stop_last: bool = False


@dataclass
class Child:
    """A supervised child and its restart bookkeeping."""

    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float | None = None
    restarts: int = 0
    quick_exits: int = 0
    last_exit_code: int | None = None
    exit_noticed: bool = False

    @property
    def running(self) -> bool:
        """Whether the process is alive right now."""
        return self.proc is not None and self.proc.poll() is None


class ChildKeepsFailing(RuntimeError):
    """A child exited too many times in a row before running `HEALTHY_AFTER_S`."""

    def __init__(self, child: Child) -> None:
        where = f"; see {child.spec.log_path}" if child.spec.log_path else ""
        super().__init__(
            f"{child.spec.name} keeps exiting soon after it starts "
            f"({child.quick_exits} times in a row, last exit code {child.last_exit_code}){where}"
        )
        self.child = child


@dataclass
class Supervisor:
    """Starts children, restarts those that exit (if `restart`), and stops them all."""

    restart: bool = True
    give_up_after: int | None = None
    clock: Callable[[], float] = time.monotonic
    children: dict[str, Child] = field(default_factory=dict)
    _logs: dict[str, IO[bytes]] = field(default_factory=dict)

    def start(self, spec: ChildSpec) -> Child:
        """Start a child in its own session, so a terminal's Ctrl-C reaches it only through us."""
        child = self.children.get(spec.name) or Child(spec)
        child.spec = spec
        self.children[spec.name] = child
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        output: IO[bytes] | None = None
        if child.spec.log_path is not None:
            if child.spec.name not in self._logs:
                child.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._logs[child.spec.name] = child.spec.log_path.open("ab")
            output = self._logs[child.spec.name]
        child.proc = subprocess.Popen(
            child.spec.argv,
            env=child.spec.env,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            start_new_session=True,
        )
        child.started_at = self.clock()
        child.restart_at = None
        child.exit_noticed = False
        log.info("started %s (pid %d)", child.spec.name, child.proc.pid)

    def __getitem__(self, name: str) -> Child:
        return self.children[name]

    def poll(self) -> list[Child]:
        """Notice exits and schedule restarts; start those whose backoff has passed.

        Returns the children that exited since the last call. Raises ChildKeepsFailing
        when a child has exited `give_up_after` times in a row, each time soon after
        starting.
        """
        now = self.clock()
        exited: list[Child] = []
        for child in self.children.values():
            if child.proc is None:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self._spawn(child)
                continue
            code = child.proc.poll()
            if code is None or child.exit_noticed:
                continue
            child.exit_noticed = True
            child.last_exit_code = code
            exited.append(child)
            if not self.restart:
                continue
            ran_s = now - child.started_at
            if ran_s >= HEALTHY_AFTER_S:
                child.backoff_s = FIRST_BACKOFF_S
                child.quick_exits = 0
            else:
                child.quick_exits += 1
            if self.give_up_after is not None and child.quick_exits >= self.give_up_after:
                raise ChildKeepsFailing(child)
            child.restart_at = now + child.backoff_s
            log.warning(
                "%s exited with %d after %.0f s; restarting in %.0f s",
                child.spec.name,
                code,
                ran_s,
                child.backoff_s,
            )
            child.backoff_s = min(MAX_BACKOFF_S, child.backoff_s * 2)
        return exited

    def signal(self, name: str, signum: int) -> None:
        """Send a signal to one child (SIGKILL and SIGTERM also wait for it to exit)."""
        proc = self.children[name].proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signum)
        if signum in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=30)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every child, then those marked `stop_last`; SIGKILL whoever lingers."""
        first = [c for c in self.children.values() if not c.spec.stop_last]
        last = [c for c in self.children.values() if c.spec.stop_last]
        for group in (first, last):
            self._stop_group(group, grace_s)
        for handle in self._logs.values():
            handle.close()
        self._logs.clear()

    def _stop_group(self, group: list[Child], grace_s: float) -> None:
        for child in group:
            child.restart_at = None
            if child.running and child.proc is not None:
                child.proc.terminate()
        deadline = time.monotonic() + grace_s
        for child in group:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", child.spec.name)
                child.proc.kill()
                child.proc.wait()
