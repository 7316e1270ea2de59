"""The process supervisor (control/processes.py) and the worker plan: real child processes."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from control.processes import (
    FIRST_BACKOFF_S,
    HEALTHY_AFTER_S,
    MAX_BACKOFF_S,
    ChildKeepsFailing,
    ChildSpec,
    Supervisor,
)
from control.workers import select_devices, worker_plan, worker_specs

CRASH = [sys.executable, "-c", "import sys; sys.exit(3)"]


def test_each_gpu_worker_sees_only_its_own_device() -> None:
    plan = worker_plan(select_devices(["0", "1", "2", "3"], "0,2"), 1, "host")
    assert plan == [
        ("gpu0@host", {"CUDA_VISIBLE_DEVICES": "0", "KOLORS_FARM_DEVICE": "cuda:0"}),
        ("gpu2@host", {"CUDA_VISIBLE_DEVICES": "2", "KOLORS_FARM_DEVICE": "cuda:0"}),
    ]
    assert select_devices(["0", "1"], None) == ["0", "1"]
    specs = worker_specs(plan, {"BASE": "1"})
    assert [s.argv[-1] for s in specs] == ["gpu0@host", "gpu2@host"]
    assert specs[1].env == {
        "BASE": "1",
        "CUDA_VISIBLE_DEVICES": "2",
        "KOLORS_FARM_DEVICE": "cuda:0",
    }


@pytest.mark.parametrize("requested", ["5", "0,0", "", "1,7"])
def test_devices_that_are_not_visible_are_refused(requested: str) -> None:
    with pytest.raises(ValueError, match="choose distinct devices"):
        select_devices(["0", "1", "2"], requested)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_exited(supervisor: Supervisor) -> None:
    for child in supervisor.children.values():
        assert child.proc is not None
        child.proc.wait(timeout=30)


def test_a_crashing_child_is_restarted_with_doubling_backoff_that_resets() -> None:
    clock = FakeClock()
    supervisor = Supervisor(restart=True, clock=clock)
    child = supervisor.start(ChildSpec("gpu0@h", CRASH, dict(os.environ)))
    delays = []
    for _ in range(8):
        wait_exited(supervisor)
        assert supervisor.poll() == [child]  # notices the exit, schedules the restart
        assert child.restart_at is not None and child.last_exit_code == 3
        delays.append(child.restart_at - clock.now)
        clock.now = child.restart_at - 0.01
        assert supervisor.poll() == []
        assert child.restart_at is not None  # not yet
        clock.now = child.restart_at
        supervisor.poll()  # restarted
        assert child.restart_at is None
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert child.restarts == 8 and child.quick_exits == 8
    # After a minute of healthy running, the next crash waits the first delay again.
    wait_exited(supervisor)
    clock.now += HEALTHY_AFTER_S + 1
    supervisor.poll()
    assert child.restart_at is not None and child.restart_at - clock.now == FIRST_BACKOFF_S
    assert child.quick_exits == 0
    assert MAX_BACKOFF_S == 60
    supervisor.stop(grace_s=5)


def test_a_child_that_keeps_dying_at_start_makes_the_supervisor_give_up(tmp_path: Path) -> None:
    clock = FakeClock()
    supervisor = Supervisor(restart=True, give_up_after=3, clock=clock)
    child = supervisor.start(
        ChildSpec("worker", CRASH, dict(os.environ), log_path=tmp_path / "worker.log")
    )

    def crash_and_restart() -> None:
        wait_exited(supervisor)
        supervisor.poll()
        clock.now = child.restart_at or clock.now
        supervisor.poll()

    crash_and_restart()
    crash_and_restart()
    with pytest.raises(ChildKeepsFailing) as failure:
        crash_and_restart()
    assert child.restarts == 2
    message = str(failure.value)
    assert "worker keeps exiting soon after it starts" in message
    assert "3 times in a row, last exit code 3" in message and "worker.log" in message
    supervisor.stop(grace_s=5)


def test_without_restart_an_exit_is_reported_once(tmp_path: Path) -> None:
    supervisor = Supervisor(restart=False)
    child = supervisor.start(
        ChildSpec(
            "once",
            [sys.executable, "-c", "print('said'); raise SystemExit(4)"],
            dict(os.environ),
            log_path=tmp_path / "once.log",
        )
    )
    wait_exited(supervisor)
    assert supervisor.poll() == [child]
    assert supervisor.poll() == []
    assert child.restart_at is None and child.last_exit_code == 4
    supervisor.stop(grace_s=5)
    assert (tmp_path / "once.log").read_text() == "said\n"


def test_each_process_sees_only_its_device_and_all_stop_together(tmp_path: Path) -> None:
    # Each child writes the CUDA_VISIBLE_DEVICES it sees into a file named after its node.
    script = (
        "import os, sys, time; "
        f"open(os.path.join({str(tmp_path)!r}, sys.argv[-1]), 'w')"
        ".write(os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(60)"
    )
    plan = [("gpu2@h", {"CUDA_VISIBLE_DEVICES": "2"}), ("gpu3@h", {"CUDA_VISIBLE_DEVICES": "3"})]
    supervisor = Supervisor(restart=True)
    for spec in worker_specs(plan, dict(os.environ)):
        supervisor.start(ChildSpec(spec.name, [sys.executable, "-c", script, spec.name], spec.env))
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
    assert not any(child.running for child in supervisor.children.values())


def test_stop_last_children_outlive_the_others(tmp_path: Path) -> None:
    # The "server" records, when it gets SIGTERM, whether the "client" was still alive.
    client = ChildSpec("client", [sys.executable, "-c", "import time; time.sleep(60)"], {})
    supervisor = Supervisor(restart=False)
    client_pid = supervisor.start(client).proc.pid  # type: ignore[union-attr]
    server_script = (
        "import os, signal, sys, time\n"
        "def bye(*_):\n"
        f"    alive = os.path.exists('/proc/{client_pid}') and 'zombie' not in "
        f"open('/proc/{client_pid}/status').read().lower()\n"
        f"    open({str(tmp_path / 'seen')!r}, 'w').write(str(alive)); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "open(sys.argv[1], 'w').close()\n"
        "time.sleep(60)\n"
    )
    ready = tmp_path / "ready"
    supervisor.start(
        ChildSpec("server", [sys.executable, "-c", server_script, str(ready)], {}, stop_last=True)
    )
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    supervisor.stop(grace_s=10)
    assert (tmp_path / "seen").read_text() == "False"
    assert supervisor["client"].proc is not None
    assert supervisor["client"].proc.returncode == -signal.SIGTERM
