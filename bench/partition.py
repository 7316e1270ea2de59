"""How long a partitioned worker host's job waits before it renders again, across hosts.

Builds the multi-host farm of the tests (tests/host_farm.py: a data host with
PostgreSQL, Redis and S3; an API host; two worker hosts; network namespaces on a
bridge, so it needs root), submits one long render, and once it renders on a worker
host cuts that host off (iptables drops all its packets). It prints the seconds from
the cut to the job rendering again on the other host (its next attempt RUNNING, read
from the database); then heals the partition, waits for the job to end, and checks it
completed once and was charged once (the cut-off worker's late writes refused by the
attempt fence). Writes bench/results/partition.json.

    sudo .venv/bin/python bench/partition.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import select  # noqa: E402

from shared.db import transaction  # noqa: E402
from shared.models import Job, LedgerEntry  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.host_farm import HostFarm, start_host_farm  # noqa: E402
from tests.hosts import netns_available  # noqa: E402
from worker.tiny import build_tiny_checkpoint  # noqa: E402

RESULTS = REPO / "bench" / "results" / "partition.json"
JOB: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "width": 1024,
    "height": 1024,
    "steps": 50,
    "number_of_images": 2,
}


def _job(farm: HostFarm, job_id: str) -> Job:
    with transaction(farm.sessions) as session:
        return session.get_one(Job, job_id)


def _wait(predicate: Any, timeout_s: float, step_s: float = 0.05) -> float:
    """Poll until `predicate()`; the monotonic time it first held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(step_s)
    raise TimeoutError(f"not within {timeout_s} s")


def one_partition(farm: HostFarm, key: str, seed: int) -> dict[str, Any]:
    """Submit, wait for the render to be under way, cut its host off, time the recovery."""
    submitted = httpx.post(
        f"{farm.url}/v2/kolors", json=JOB | {"seed": seed}, headers={"x-api-key": key}, timeout=30
    ).json()
    job_id = submitted["request_id"]
    _wait(lambda: _job(farm, job_id).state == "RUNNING", 60)
    first = _job(farm, job_id)
    (host,) = [h for h in farm.workers.values() if farm.worker_name(h) == first.worker]
    time.sleep(1.0)  # well into its render
    cut = time.monotonic()
    host.cut_off()
    try:
        again = _wait(
            lambda: (job := _job(farm, job_id)).state == "RUNNING" and job.attempt > first.attempt,
            120,
        )
    finally:
        host.reconnect()
    moved_to = _job(farm, job_id).worker
    _wait(lambda: _job(farm, job_id).state in ("COMPLETED", "FAILED", "CANCELLED"), 300, 0.2)
    farm.wait_for_workers([host])  # back: its stale attempt's writes were refused meanwhile
    done = _job(farm, job_id)
    with transaction(farm.sessions) as session:
        kinds = list(session.scalars(select(LedgerEntry.kind).where(LedgerEntry.job_id == job_id)))
    return {
        "rendering_again_s": round(again - cut, 2),
        "cut_off": first.worker,
        "moved_to": moved_to,
        "state": done.state,
        "attempts": done.attempt,
        "images": done.images_done,
        "holds": kinds.count("hold"),
        "captures": kinds.count("capture"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=3, help="partitions to time")
    args = parser.parse_args()
    unavailable = netns_available()
    if unavailable is not None:
        sys.exit(f"cannot build test hosts: {unavailable}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = build_tiny_checkpoint(root / "model" / "tiny")
        # The production heartbeat (the tests beat every second).
        beat = {"KOLORS_FARM_HEARTBEAT_INTERVAL_S": str(Settings().heartbeat_interval_s)}
        farm = start_host_farm(root / "hosts", model, settings=beat)
        try:
            key = farm.create_user("bench", "10000")
            for seed in range(args.repeat):
                rows.append(one_partition(farm, key, seed))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            farm.close()
    table = Table(title="A worker host cut off mid-render (multi-host farm, tiny checkpoint)")
    for column in ("rendering again (s)", "cut off", "moved to", "state", "attempts",
                   "images", "holds / captures"):  # fmt: skip
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["rendering_again_s"]), row["cut_off"], row["moved_to"], row["state"],
            str(row["attempts"]), str(row["images"]), f"{row['holds']} / {row['captures']}",
        )  # fmt: skip
    Console().print(table)
    machine = {"cpus": os.cpu_count(), "platform": sys.platform}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
