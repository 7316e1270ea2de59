"""The `kolors-farm` command line, run as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from control.processes import free_port
from control.workers import worker_plan

REPO = Path(__file__).resolve().parent.parent


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, KOLORS_FARM_DATA_DIR=str(tmp_path / "var"), PYTHONPATH=str(REPO))
    env.pop("KOLORS_FARM_DATABASE_URL", None)
    env.pop("KOLORS_FARM_REDIS_URL", None)
    cli(env, "migrate")
    return env


def descendants(pid: int) -> list[str]:
    """Every process below `pid` (the farm's children start their own sessions)."""
    found: list[str] = []
    pending = [str(pid)]
    while pending:
        children = subprocess.run(
            ["pgrep", "-P", pending.pop()], capture_output=True, text=True
        ).stdout.split()
        found += children
        pending += children
    return found


def test_users_create_prints_the_key_last_and_credits_grant_adds(
    env: dict[str, str], tmp_path: Path
) -> None:
    from shared.accounts.ledger import get_balance, ledger_balance
    from shared.accounts.users import authenticate
    from shared.db import make_engine, make_session_factory, transaction

    out = cli(env, "users", "create", "carol", "--tenant", "design", "--credits", "2.5").stdout
    key = out.strip().splitlines()[-1]
    assert key.startswith("kf_") and " " not in key
    assert "granted 1.25 credits" in cli(env, "credits", "grant", "carol", "1.25").stdout
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'farm.db'}")
    with transaction(make_session_factory(engine)) as session:
        principal = authenticate(session, key)
        assert principal.user_name == "carol"
        assert get_balance(session, principal.user_id) == 3750
        assert ledger_balance(session, principal.user_id) == 3750
    engine.dispose()


def test_cli_errors_are_clear(env: dict[str, str]) -> None:
    cli(env, "users", "create", "dave")
    duplicate = cli(env, "users", "create", "dave", check=False)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    missing = cli(env, "credits", "grant", "nobody", "1", check=False)
    assert missing.returncode == 1 and "No user named 'nobody'" in missing.stderr
    bad = cli(env, "credits", "grant", "dave", "0.0001", check=False)
    assert bad.returncode == 2 and "three decimals" in bad.stderr


def test_tiny_model_command_writes_a_loadable_checkpoint(
    env: dict[str, str], tmp_path: Path
) -> None:
    target = tmp_path / "tiny"
    cli(env, "tiny-model", str(target))
    assert (target / "model_index.json").is_file()
    assert {p.name for p in target.iterdir()} >= {
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
        "scheduler",
    }


def test_worker_exits_non_zero_when_the_model_cannot_load(
    env: dict[str, str], tmp_path: Path
) -> None:
    broken = dict(
        env,
        KOLORS_FARM_MODEL=str(tmp_path / "no-such-model"),
        KOLORS_FARM_REDIS_URL="redis://127.0.0.1:1/0",
        HF_HUB_OFFLINE="1",
    )
    result = cli(broken, "worker", "--device", "cpu", check=False)
    assert result.returncode == 1
    assert "could not load the Kolors pipeline" in result.stderr


def test_worker_plan_pins_one_device_per_process() -> None:
    plan = worker_plan(["0", "2"], cpu_workers=4, host="h")
    assert plan == [
        ("gpu0@h", {"CUDA_VISIBLE_DEVICES": "0", "KOLORS_FARM_DEVICE": "cuda:0"}),
        ("gpu2@h", {"CUDA_VISIBLE_DEVICES": "2", "KOLORS_FARM_DEVICE": "cuda:0"}),
    ]
    cpu = worker_plan([], cpu_workers=2, host="h")
    assert [name for name, _ in cpu] == ["cpu0@h", "cpu1@h"]
    assert all(extra["CUDA_VISIBLE_DEVICES"] == "" for _, extra in cpu)


def test_up_runs_the_whole_farm_and_stops_every_child(
    env: dict[str, str], tiny_model_dir: Path
) -> None:
    port = free_port()
    farm_env = dict(env, KOLORS_FARM_MODEL=str(tiny_model_dir))
    proc = subprocess.Popen(
        [sys.executable, "-m", "control", "up", "--port", str(port)],
        env=farm_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines[-30:])
            lines.append(line)
            if "Kolors render farm is up at" in line:
                break
        assert f"http://127.0.0.1:{port}" in lines[-1]
        key = cli(farm_env, "users", "create", "eve", "--credits", "1").stdout.split()[-1]
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/kolors",
            data={"prompt": "a fox", "width": "512", "height": "512"},
            headers={"x-api-key": key},
            timeout=120,
        )
        assert response.status_code == 200
        assert response.headers["x-remaining-credits"] == "0.75"
        children = descendants(proc.pid)
        assert len(children) >= 4  # redis, worker, api and its gunicorn worker
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        alive = [
            pid
            for pid in children
            if Path(f"/proc/{pid}").exists()
            and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
        ]
        assert alive == []
        assert (Path(env["KOLORS_FARM_DATA_DIR"]) / "redis" / "appendonlydir").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


def test_workers_refuses_devices_that_are_not_visible(env: dict[str, str]) -> None:
    result = cli(env | {"CUDA_VISIBLE_DEVICES": "0,1"}, "workers", "--devices", "0,4", check=False)
    assert result.returncode == 2
    assert "choose distinct devices among the visible ones (0, 1)" in result.stderr


def test_workers_restarts_a_worker_killed_with_sigkill(
    env: dict[str, str], redis_url: str, tiny_model_dir: Path
) -> None:
    from shared.redis_client import make_redis
    from shared.scheduling.fleet import live_workers

    env = env | {
        "KOLORS_FARM_REDIS_URL": redis_url,
        "KOLORS_FARM_MODEL": str(tiny_model_dir),
        "KOLORS_FARM_HEARTBEAT_INTERVAL_S": "0.5",
        "CUDA_VISIBLE_DEVICES": "",
    }
    client = make_redis(redis_url)
    launcher = subprocess.Popen([sys.executable, "-m", "control", "workers"], env=env)

    def worker_pid() -> int | None:
        workers = live_workers(client)
        return next((int(info["pid"]) for info in workers.values()), None)

    try:
        deadline = time.monotonic() + 120
        while (first := worker_pid()) is None:
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert set(live_workers(client)) == {f"cpu0@{os.uname().nodename}"}
        os.kill(first, signal.SIGKILL)
        while (second := worker_pid()) in (None, first):
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert second != first and str(second) in descendants(launcher.pid)
    finally:
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0
    with pytest.raises(ProcessLookupError):  # the launcher stopped its worker on the way out
        os.kill(second, 0)


def test_fair_share_weights_are_set_from_the_command_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    from sqlalchemy import select

    from shared.db import make_engine, make_session_factory, transaction
    from shared.models import Tenant, User

    cli(env, "users", "create", "dana", "--tenant", "vision")
    assert "weight 3" in cli(env, "users", "weight", "dana", "3").stdout
    assert "weight 2" in cli(env, "tenants", "weight", "vision", "2").stdout
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'farm.db'}")
    with transaction(make_session_factory(engine)) as session:
        assert session.scalar(select(User.weight).where(User.name == "dana")) == 3
        assert session.scalar(select(Tenant.weight).where(Tenant.name == "vision")) == 2
    engine.dispose()
    missing = cli(env, "tenants", "weight", "nobody", "2", check=False)
    assert missing.returncode == 1 and "No tenant named 'nobody'" in missing.stderr
    zero = cli(env, "users", "weight", "dana", "0", check=False)
    assert zero.returncode == 2 and "0 is not in the range 1<=x<=10000" in zero.stderr
