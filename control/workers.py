"""`kolors-farm workers`: one render worker process per device, restarted with backoff when it dies.

Each worker sees only its own GPU (CUDA_VISIBLE_DEVICES) and is named after it
(`gpu2@host`). The job a dead worker held is recovered by the dispatcher when
its lease lapses.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from control.processes import ChildSpec, Supervisor

log = logging.getLogger("kolors_farm.workers")


def visible_cuda_devices() -> list[str]:
    """CUDA device indices this process may use (honours CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


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


def worker_plan(
    devices: list[str], cpu_workers: int, host: str
) -> list[tuple[str, dict[str, str]]]:
    """(node name, extra environment) per worker: one per CUDA device, else CPU workers."""
    if devices:
        return [
            (f"gpu{d}@{host}", {"CUDA_VISIBLE_DEVICES": d, "KOLORS_FARM_DEVICE": "cuda:0"})
            for d in devices
        ]
    # CPU workers split the cores, and their OpenMP threads sleep rather than spin while
    # they wait: the API, the dispatcher and Redis share these cores, and spinning
    # threads that lose their core slow every render several times over.
    threads = str(max(1, (os.cpu_count() or 1) // cpu_workers))
    return [
        (
            f"cpu{i}@{host}",
            {
                "CUDA_VISIBLE_DEVICES": "",
                "KOLORS_FARM_DEVICE": "cpu",
                "OMP_NUM_THREADS": threads,
                "OMP_WAIT_POLICY": "PASSIVE",
            },
        )
        for i in range(cpu_workers)
    ]


def worker_specs(
    plan: list[tuple[str, dict[str, str]]], base_env: dict[str, str], log_dir: Path | None = None
) -> list[ChildSpec]:
    """A child process per planned worker: `python -m worker worker --name NAME`."""
    return [
        ChildSpec(
            name=name,
            argv=[sys.executable, "-m", "worker", "worker", "--name", name],
            env=base_env | extra,
            log_path=log_dir / f"{name}.log" if log_dir is not None else None,
        )
        for name, extra in plan
    ]


def run_workers(plan: list[tuple[str, dict[str, str]]], base_env: dict[str, str]) -> int:
    """Supervise the planned workers until SIGINT/SIGTERM; they are restarted whenever they die."""
    supervisor = Supervisor(restart=True)
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info("supervising %s on %s", ", ".join(n for n, _ in plan), socket.gethostname())
    for spec in worker_specs(plan, base_env):
        supervisor.start(spec)
    try:
        while not stopping:
            supervisor.poll()
            time.sleep(0.5)
    finally:
        # A worker finishes or gives back its job on SIGTERM; allow for a render's end.
        supervisor.stop(grace_s=30.0)
    return 0
