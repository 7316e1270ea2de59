"""A short soak (`bench/soak.py --minutes 1`): a farm of real processes under mixed load
while every kind of fault is injected; nothing may be lost or charged twice.

About two minutes: the farm starts, a minute of load and chaos, the drain, the audit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import FAULT_KINDS

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.faults


def test_a_short_soak_loses_nothing_and_charges_nothing_twice(tmp_path: Path) -> None:
    results = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "bench/soak.py", "--minutes", "1", "--json", str(results)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(results.read_text())
    assert run.returncode == 0, (report["problems"], run.stdout[-6000:], run.stderr[-3000:])
    assert report["problems"] == []
    assert report["lost"] == [] and report["charged_twice"] == []
    assert report["abandoned"] == 0 and report["drained"]
    assert report["audit"]["findings"] == 0
    # Every kind of fault happened, and work went through around them.
    assert set(report["faults"]) == set(FAULT_KINDS)
    assert all(count >= 1 for count in report["faults"].values()), report["faults"]
    assert report["submitted"]["async"] > 0 and report["submitted"]["sync"] > 0
    assert report["completed"] > 0 and report["audit"]["jobs"] == report["jobs"]
    assert report["audit"]["images"] > 0 and report["audit"]["objects"] == report["audit"]["images"]
    assert report["idempotent_retries"]["sent"] > 0
    assert report["idempotent_retries"]["mismatches"] == 0
    hooks = report["webhooks"]
    assert hooks["expected"] > 0 and hooks["delivered"] == hooks["expected"]
    assert hooks["bad_signatures"] == 0
