"""How long a lost worker's job waits before it renders again, measured black-box under `up`.

Runs `kolors-farm up --workers 2` (SQLite, the tiny checkpoint, on this machine), submits
one long render, and once it renders on a worker:

- `kill -9`: the worker dies; `up` restarts it under the same name, which gives back its
  previous life's claim;
- `SIGSTOP`: the worker freezes, as a host cut off from the network does (no heartbeat,
  no lease renewal, no writes); the dispatcher gives its claim back once its heartbeat
  lapses, and after `SIGCONT` its late writes are refused by the attempt fence.

For each it prints the seconds from the fault to the job rendering again (its next
attempt RUNNING, read from the database), checks the job completed once and was
charged once, and writes bench/results/recovery.json.

    .venv/bin/python bench/recovery.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scratch import wait_healthy  # noqa: E402
from control.processes import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "recovery.json"
IMAGES, STEPS = 4, 50
JOB: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "width": 1024,
    "height": 1024,
    "steps": STEPS,
    "number_of_images": IMAGES,
    "seed": 7,
}


def _kolors_farm(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "kolors-farm"), *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


def _row(db: Path, job_id: str) -> tuple[str, int, str | None, int]:
    with sqlite3.connect(db, timeout=10) as connection:
        row = connection.execute(
            "SELECT state, attempt, worker, images_done FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


def _wait(predicate: Any, timeout_s: float, step_s: float = 0.05) -> float:
    """Poll until `predicate()` is true; the monotonic time it became so."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(step_s)
    raise TimeoutError("the farm did not get there in time")


def _worker_pid(url: str, name: str) -> int:
    workers = httpx.get(f"{url}/readyz", timeout=5).json()["workers"]
    return int(workers[name]["pid"])


def _live_workers(url: str) -> int:
    try:
        return len(httpx.get(f"{url}/readyz", timeout=5).json()["workers"])
    except httpx.HTTPError:
        return 0


def one_fault(url: str, key: str, db: Path, fault: str) -> dict[str, Any]:
    """Submit, wait for the render to be under way, inject `fault`, time the recovery."""
    headers = {"x-api-key": key}
    before = httpx.get(f"{url}/v1/get-user-credits", headers=headers, timeout=10).json()
    submitted = httpx.post(f"{url}/v2/kolors", json=JOB, headers=headers, timeout=30).json()
    job_id = submitted["request_id"]
    _wait(lambda: _row(db, job_id)[0] == "RUNNING", 60)
    _, attempt, worker, _ = _row(db, job_id)
    assert worker is not None
    time.sleep(1.0)  # well into its render
    pid = _worker_pid(url, worker)
    faulted = time.monotonic()
    os.kill(pid, signal.SIGKILL if fault == "kill -9" else signal.SIGSTOP)
    again = _wait(
        lambda: (row := _row(db, job_id))[0] == "RUNNING" and row[1] > attempt,
        120,
    )
    _, _, new_worker, _ = _row(db, job_id)
    if fault == "SIGSTOP":
        os.kill(pid, signal.SIGCONT)  # back from the partition: its writes must be refused
    _wait(lambda: _row(db, job_id)[0] in ("COMPLETED", "FAILED", "CANCELLED"), 300, 0.2)
    state, final_attempt, _, images_done = _row(db, job_id)
    after = httpx.get(f"{url}/v1/get-user-credits", headers=headers, timeout=10).json()
    result = httpx.get(submitted["response_url"], headers=headers, timeout=10).json()
    charged = round(float(before["credits"]) - float(after["credits"]), 3)
    price = IMAGES * STEPS / 25  # 1 credit: 1024x1024, 25 steps
    return {
        "fault": fault,
        "rendering_again_s": round(again - faulted, 2),
        "same_worker": new_worker == worker,
        "state": state,
        "attempts": final_attempt,
        "images": images_done,
        "images_in_result": len(result["output"]),
        "charged": charged,
        "price": price,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=3, help="faults of each kind")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch)
        port = free_port()
        env = dict(
            os.environ,
            KOLORS_FARM_DATA_DIR=str(data),
            KOLORS_FARM_MODEL="tiny",
            KOLORS_FARM_CACHE="false",  # every repeat renders
        )
        env.pop("KOLORS_FARM_REDIS_URL", None)
        env.pop("KOLORS_FARM_DATABASE_URL", None)
        log = data / "up.log"
        with log.open("w") as out:
            up = subprocess.Popen(
                [str(REPO / ".venv" / "bin" / "kolors-farm"), "up", "--port", str(port),
                 "--workers", "2"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, log, timeout_s=180)
            key = _kolors_farm(env, "users", "create", "bench", "--credits", "10000").split()[-1]
            rows = []
            for fault in ("kill -9", "SIGSTOP"):
                for _ in range(args.repeat):
                    _wait(lambda: _live_workers(url) == 2, 120, 0.5)
                    rows.append(one_fault(url, key, data / "farm.db", fault))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(timeout=60)
    print()
    print("| fault | rendering again (s) | same worker | state | attempts | charged / price |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['fault']} | {row['rendering_again_s']} | {row['same_worker']} | "
            f"{row['state']} | {row['attempts']} | {row['charged']} / {row['price']} |"
        )
    machine = {"cpus": os.cpu_count(), "platform": sys.platform}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
