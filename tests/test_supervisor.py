"""The worker launcher: one process per chosen device, restarted with backoff."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from api.launcher import worker_plan
from api.supervisor import FIRST_BACKOFF_S, MAX_BACKOFF_S, WorkerSupervisor, select_devices


def test_each_gpu_worker_sees_only_its_own_device() -> None:
    plan = worker_plan(select_devices(["0", "1", "2", "3"], "0,2"), 1, "host")
    assert plan == [
        ("gpu0@host", {"CUDA_VISIBLE_DEVICES": "0", "KOLORS_FARM_DEVICE": "cuda:0"}),
        ("gpu2@host", {"CUDA_VISIBLE_DEVICES": "2", "KOLORS_FARM_DEVICE": "cuda:0"}),
    ]
    assert select_devices(["0", "1"], None) == ["0", "1"]


@pytest.mark.parametrize("requested", ["5", "0,0", "", "1,7"])
def test_devices_that_are_not_visible_are_refused(requested: str) -> None:
    with pytest.raises(ValueError, match="choose distinct devices"):
        select_devices(["0", "1", "2"], requested)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_exited(supervisor: WorkerSupervisor) -> None:
    for worker in supervisor.workers:
        assert worker.proc is not None
        worker.proc.wait(timeout=30)


def test_a_crashing_worker_is_restarted_with_doubling_backoff_that_resets() -> None:
    clock = FakeClock()
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    supervisor = WorkerSupervisor(
        [("gpu0@h", {"CUDA_VISIBLE_DEVICES": "0"})], dict(os.environ), clock, crash
    )
    supervisor.start()
    worker = supervisor.workers[0]
    delays = []
    for _ in range(8):
        wait_exited(supervisor)
        supervisor.poll()  # notices the exit, schedules the restart
        assert worker.restart_at is not None
        delays.append(worker.restart_at - clock.now)
        clock.now = worker.restart_at - 0.01
        supervisor.poll()
        assert worker.restart_at is not None  # not yet
        clock.now = worker.restart_at
        supervisor.poll()  # restarted
        assert worker.restart_at is None
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert worker.restarts == 8
    # After a minute of healthy running, the next crash waits the first delay again.
    wait_exited(supervisor)
    clock.now += 61
    supervisor.poll()
    assert worker.restart_at is not None and worker.restart_at - clock.now == FIRST_BACKOFF_S
    assert MAX_BACKOFF_S == 60


def test_each_process_sees_only_its_device_and_all_stop_together(tmp_path: Path) -> None:
    # Each child writes the CUDA_VISIBLE_DEVICES it sees into a file named after its node.
    script = (
        "import os, sys, time; "
        f"open(os.path.join({str(tmp_path)!r}, sys.argv[2]), 'w')"
        ".write(os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(60)"
    )
    supervisor = WorkerSupervisor(
        [("gpu2@h", {"CUDA_VISIBLE_DEVICES": "2"}), ("gpu3@h", {"CUDA_VISIBLE_DEVICES": "3"})],
        dict(os.environ),
        command=[sys.executable, "-c", script],
    )
    supervisor.start()
    try:
        deadline = time.monotonic() + 30
        while (
            len([p for p in tmp_path.iterdir() if p.read_text()]) < 2
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
            "gpu2@h": "2",
            "gpu3@h": "3",
        }
    finally:
        supervisor.stop(grace_s=10)
    assert all(w.proc is not None and w.proc.poll() is not None for w in supervisor.workers)
