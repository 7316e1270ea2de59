"""The GPU benchmark rehearsed on the CPU: bench/gpu/run.sh, every stage, the tiny configuration.

The same entry point and code path a GPU run takes (the pipeline built from committed
config files, the farm's renderer and options, `kolors-farm up` over HTTP, the saved
checkpoint, the cold-start worker, the JSON lines), at the tiny checkpoint's sizes, so
that a run on a GPU machine can only fail for reasons of the GPU. Timings are not checked,
only that every row is there and holds sane values. The tiny profile runs three tasks
at once to stay short (a GPU run takes them one at a time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EAGER_LEVELS = [
    "fp16, no SDPA",
    "fp16 (diffusers default: SDPA)",
    "bf16",
    "bf16 + channels-last",
]
COMPILE_LEVEL = "bf16 + channels-last + compile (default)"


def run_bench(tmp_path: Path) -> tuple[list[dict[str, Any]], str]:
    """Run every stage on the tiny profile; the result rows and the printed output."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_FARM_")}
    # The CPU even on a machine with a GPU: up plans its workers by the visible devices.
    env |= {"PYTHON": sys.executable, "KOLORS_FARM_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu" / "run.sh"), str(out), "--profile", "tiny",
         "--work", str(tmp_path / "work"), "--budget-s", "240"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert (out / "bench.log").read_text().count("[a] ") == 1
    return [json.loads(line) for line in lines], output


def test_every_stage_runs_on_the_cpu_and_writes_its_rows(tmp_path: Path) -> None:
    rows, output = run_bench(tmp_path)
    failed = [row for row in rows if row.get("ok") is False]
    assert not failed, failed
    stages = {row["stage"] for row in rows}
    assert stages == {"env", "a", "b", "save", "c", "d", "e", "summary"}, output[-4000:]
    by_stage = {stage: [row for row in rows if row["stage"] == stage] for stage in stages}

    (env,) = by_stage["env"]
    assert env["profile"] == "tiny" and env["torch"] and env["diffusers"] == "0.42.1"

    (eager,) = by_stage["a"]
    assert eager["dtype"] == "float16" and eager["width"] == 128 and eager["steps"] == 2
    assert eager["s_per_image"] > 0 and eager["it_per_s"] > 0 and eager["finite"] is True
    assert len(eager["s_per_image_samples"]) == eager["repeats"] == 2
    assert eager["weights"] == "random (tiny-config)"

    levels = by_stage["b"]
    assert [row["name"] for row in levels] == [*EAGER_LEVELS, COMPILE_LEVEL]
    for row in levels:
        assert row["s_per_image"] > 0 and row["finite"] is True, row
        assert row["speedup_vs_eager_fp16"] > 0, row
    # Against the farm's fp16 level, from that level on (the first level runs before it).
    assert levels[0]["speedup_vs_farm_fp16"] is None
    assert all(row["speedup_vs_farm_fp16"] > 0 for row in levels[1:])
    assert [row["dtype"] for row in levels] == ["float16", "float16", *["bfloat16"] * 3]
    compiled = levels[-1]
    assert compiled["options"] == {"sdpa": True, "channels_last": True, "compile": "default"}
    assert compiled["compile_s"] >= 0 and compiled["compile_backend"] == "aot_eager"

    (saved,) = by_stage["save"]
    assert saved["bytes"] > 0 and saved["variant"] == "fp16"
    assert saved["variant_loads_as"] == "bfloat16"  # the fp16 files load as a GPU worker does

    (farm,) = by_stage["c"]
    assert farm["states"] == ["COMPLETED"] and farm["jobs"] == 2
    assert farm["bare_total_s"] > 0 and farm["farm_total_s"] > 0 and farm["throughput_ratio"] > 0
    assert 0 < farm["job_occupancy"] <= farm["jobs"]
    # Null until the worker reports it in its heartbeat.
    assert farm["busy_fraction"] is None or 0 <= farm["busy_fraction"] <= 1

    large, many = by_stage["d"]
    assert (large["width"], large["images"], many["width"], many["images"]) == (256, 1, 128, 10)
    for row in (large, many):
        assert row["oom"] is False and row["finite"] is True
        assert sum(call["images"] for call in row["calls"]) == row["images"]
        # No CUDA memory to measure on a CPU: the comparison is left open, not passed.
        assert row["model_mb_per_megapixel"] == 1600 and row["model_holds"] is None

    (cold,) = by_stage["e"]
    assert cold["bare_load_s"] > 0 and cold["worker_ready_s"] >= cold["worker_heartbeat_s"] > 0
    assert cold["worker_log_read_s"] is not None and cold["worker_warmup_s"] is not None
    assert cold["ratio"] > 0 and cold["ratio_vs_load_only"] > 0 and cold["ran_beside_bare"]

    (summary,) = by_stage["summary"]
    assert set(summary["tasks"].values()) == {"done"}
    assert summary["targets"]["best_level"] in [eager["name"], *(row["name"] for row in levels)]
