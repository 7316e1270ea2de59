"""`kolors-farm workers`: one worker process per device, restarted with backoff when it dies.

Each worker sees only its own GPU (CUDA_VISIBLE_DEVICES) and is named after it
(`gpu2@host`). A worker that exits is started again after a delay that doubles
with each quick failure (1 s up to 60 s) and resets once it has run for a
minute, so a crash loop (a broken model path, a sick GPU) cannot spin the CPU,
while a one-off crash costs one second. The job it held is recovered by the
dispatcher when its lease lapses.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger("kolors_farm.workers")

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
HEALTHY_AFTER_S = 60.0


@dataclass
class SupervisedWorker:
    """One device's worker process and its restart bookkeeping."""

    name: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float | None = None
    restarts: int = 0


@dataclass
class WorkerSupervisor:
    """Starts, watches and restarts a fixed set of worker processes."""

    plan: list[tuple[str, dict[str, str]]]
    base_env: dict[str, str]
    clock: Callable[[], float] = time.monotonic
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "worker", "worker"])
    workers: list[SupervisedWorker] = field(default_factory=list)

    def start(self) -> None:
        """Start every planned worker."""
        self.workers = [SupervisedWorker(name, self.base_env | extra) for name, extra in self.plan]
        for worker in self.workers:
            self._spawn(worker)

    def _spawn(self, worker: SupervisedWorker) -> None:
        argv = [*self.command, "--name", worker.name]
        worker.proc = subprocess.Popen(argv, env=worker.env, start_new_session=True)
        worker.started_at = self.clock()
        worker.restart_at = None
        log.info("started %s (pid %d)", worker.name, worker.proc.pid)

    def poll(self) -> None:
        """Notice exits and schedule restarts; start the ones whose backoff has passed."""
        now = self.clock()
        for worker in self.workers:
            if worker.proc is not None and worker.restart_at is None:
                code = worker.proc.poll()
                if code is None:
                    continue
                ran_s = now - worker.started_at
                if ran_s >= HEALTHY_AFTER_S:
                    worker.backoff_s = FIRST_BACKOFF_S
                worker.restart_at = now + worker.backoff_s
                log.warning(
                    "%s exited with %d after %.0f s; restarting in %.0f s",
                    worker.name,
                    code,
                    ran_s,
                    worker.backoff_s,
                )
                worker.backoff_s = min(MAX_BACKOFF_S, worker.backoff_s * 2)
            elif worker.restart_at is not None and now >= worker.restart_at:
                worker.restarts += 1
                self._spawn(worker)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM every worker (Celery finishes or requeues its job), then SIGKILL stragglers."""
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def select_devices(visible: list[str], requested: str | None) -> list[str]:
    """The devices to serve: all visible ones, or the requested subset (ValueError if absent)."""
    if requested is None:
        return visible
    chosen = [d.strip() for d in requested.split(",") if d.strip()]
    missing = [d for d in chosen if d not in visible]
    if missing or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"--devices {requested!r}: choose distinct devices among the visible ones "
            f"({', '.join(visible) or 'none'})"
        )
    return chosen


def run_workers(plan: list[tuple[str, dict[str, str]]], base_env: dict[str, str]) -> int:
    """Supervise the planned workers until SIGINT/SIGTERM."""
    supervisor = WorkerSupervisor(plan, base_env)
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info("supervising %s on %s", ", ".join(n for n, _ in plan), socket.gethostname())
    supervisor.start()
    try:
        while not stopping:
            supervisor.poll()
            time.sleep(0.5)
    finally:
        supervisor.stop()
    return 0
