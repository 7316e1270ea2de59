"""`kolors-farm render` and `kolors-farm requests` against a real farm, run as real processes.

One farm for the module (a CPU worker on the tiny checkpoint, the dispatcher, the API under
gunicorn). It runs on SQLite: the client speaks only HTTP, so the database behind the API
changes nothing it does, and both databases are covered by the API's own tests.
The client runs with no database settings and a data dir that must never appear, proving it
needs nothing but the farm's URL and a key.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from PIL import Image

from control.client import EXIT_API, EXIT_FAILED, EXIT_OK
from control.processes import ChildSpec, free_port
from tests.farms import FarmFactory, RunningFarm
from tests.processes import REPO, wait_for

pytestmark = pytest.mark.e2e

WORKER = "client-cpu0"


@pytest.fixture(scope="module")
def farm(module_farms: FarmFactory) -> RunningFarm:
    return module_farms.start("client", workers=[WORKER])


@pytest.fixture(scope="module")
def key(farm: RunningFarm) -> str:
    return farm.processes.create_user("client-user", "100")


@pytest.fixture
def client_env(farm: RunningFarm, key: str, tmp_path: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KOLORS_")}
    return env | {
        "PYTHONPATH": str(REPO),
        "KOLORS_FARM_URL": farm.url,
        "KOLORS_FARM_API_KEY": key,
        "KOLORS_FARM_DATA_DIR": str(tmp_path / "must-not-exist"),
        "COLUMNS": "200",
    }


def kolors_farm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, as a process; its exit code and output."""
    result = subprocess.run(
        [sys.executable, "-m", "control", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    if env["KOLORS_FARM_API_KEY"]:
        assert env["KOLORS_FARM_API_KEY"] not in result.stdout + result.stderr
    assert not Path(env["KOLORS_FARM_DATA_DIR"]).exists()
    return result


def api(farm: RunningFarm, key: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{farm.url}{path}", headers={"x-api-key": key}, **kw)


def credits(farm: RunningFarm, key: str) -> str:
    value: str = api(farm, key, "GET", "/v1/get-user-credits").json()["credits"]
    return value


def test_render_writes_each_image_named_by_request_and_seed(
    client_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "images"
    result = kolors_farm(
        client_env,
        "render", "a red fox in the snow", "-n", "2", "--size", "512x512", "--steps", "2",
        "--format", "png", "--seed", "41", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert len(paths) == 2
    request_id = re.search(r"request (\S+) queued", result.stderr)
    assert request_id, result.stderr
    assert [p.name for p in paths] == [f"{request_id[1]}-{seed}.png" for seed in (41, 42)]
    assert sorted(out.iterdir()) == sorted(paths)
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (512, 512)


def test_render_json_prints_one_document_and_no_progress(
    farm: RunningFarm, key: str, client_env: dict[str, str], tmp_path: Path
) -> None:
    result = kolors_farm(
        client_env,
        "render", "a lighthouse at dusk", "--size", "512x576", "--steps", "2",
        "--format", "jpeg", "--seed", "5", "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    document = json.loads(result.stdout)
    assert document["status"] == "COMPLETED" and document["seeds"] == [5]
    assert document["cancelled"] is False and document["error"] is None
    [path] = [Path(name) for name in document["files"]]
    assert path.name == f"{document['request_id']}-5.jpg"
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == (512, 576)
    # Only the request's id goes to stderr: no progress display.
    assert result.stderr == f"request {document['request_id']} queued\n"
    assert api(farm, key, "GET", f"/v2/requests/{document['request_id']}").json()["seeds"] == [5]
    # It followed the render on the request's event stream, not by polling.
    assert f"GET /v2/requests/{document['request_id']}/events" in farm.processes.log("api")


def test_the_farm_refuses_a_bad_parameter_by_field_and_rule_and_queues_nothing(
    farm: RunningFarm, key: str, client_env: dict[str, str], tmp_path: Path
) -> None:
    before = credits(farm, key)
    result = kolors_farm(client_env, "render", "a fox", "--steps", "500", "--out", str(tmp_path))
    assert result.returncode == EXIT_API
    assert "HTTP 400" in result.stderr
    assert "steps: " in result.stderr and "(rule: less_than_equal)" in result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []
    as_json = kolors_farm(client_env, "render", "a fox", "--cfg", "99", "--json")
    assert as_json.returncode == EXIT_API
    document = json.loads(as_json.stdout)
    assert document["http_status"] == 400
    assert [(e["field"], e["rule"]) for e in document["errors"]] == [("cfg", "less_than_equal")]
    # No hold was placed: no job was created.
    assert credits(farm, key) == before
    # Free checks stay on this side: nothing is sent.
    size = kolors_farm(client_env, "render", "a fox", "--size", "512by512")
    assert size.returncode == 2 and "is not WIDTHxHEIGHT" in size.stderr


def test_a_refused_key_and_an_unreachable_farm_are_said_plainly(
    client_env: dict[str, str],
) -> None:
    wrong = client_env | {"KOLORS_FARM_API_KEY": "kf_" + "w" * 43}
    refused = kolors_farm(wrong, "render", "a fox", "--steps", "2")
    assert refused.returncode == EXIT_API
    assert "the API key was refused" in refused.stderr
    listing = kolors_farm(wrong, "requests", "show", "anything")
    assert listing.returncode == EXIT_API and "the API key was refused" in listing.stderr
    nowhere = client_env | {"KOLORS_FARM_URL": f"http://127.0.0.1:{free_port()}"}
    unreachable = kolors_farm(nowhere, "requests", "cancel", "anything")
    assert unreachable.returncode == EXIT_API
    assert "cannot reach the farm at http://127.0.0.1:" in unreachable.stderr
    missing = kolors_farm(client_env | {"KOLORS_FARM_API_KEY": ""}, "render", "a fox")
    assert missing.returncode == 2 and "no API key" in missing.stderr


def start_render(env: dict[str, str], stdin: int, *args: str) -> tuple[subprocess.Popen[str], str]:
    """`render ARGS` in the background, once it has submitted; the process and request id."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "control", "render", *args],
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr: IO[str] | None = proc.stderr
    assert stderr is not None
    first = stderr.readline()
    found = re.search(r"request (\S+) queued", first)
    assert found, first + proc.communicate(timeout=30)[1]
    return proc, found[1]


# Slow enough to be interrupted mid-render on the tiny checkpoint (see test_cancel_running).
LONG = ("a slow render", "-n", "4", "--size", "512x512", "--steps", "50", "--format", "png")


def test_ctrl_c_asks_and_cancels_the_request(
    farm: RunningFarm, key: str, client_env: dict[str, str], tmp_path: Path
) -> None:
    proc, request_id = start_render(client_env, subprocess.PIPE, *LONG, "--out", str(tmp_path))
    try:
        assert proc.stdin is not None
        proc.stdin.write("y\n")
        proc.stdin.flush()

        def processing() -> bool:
            body = api(farm, key, "GET", f"/v2/requests/{request_id}/status").json()
            assert body["status"] in ("QUEUED", "PROCESSING"), body
            return bool(body["status"] == "PROCESSING")

        wait_for(processing, 60, "the render to start", interval_s=0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_FAILED, stderr
    assert f"Cancel request {request_id}? [y/N]" in stderr
    assert f"request {request_id} was cancelled" in stderr
    status = api(farm, key, "GET", f"/v2/requests/{request_id}/status")
    assert status.status_code == 422
    assert status.json()["status"] == "FAILED" and status.json()["cancelled"] is True
    # Images delivered before the cancel are saved and printed; the rest were never made.
    assert len(stdout.splitlines()) == status.json()["progress"]["images_done"] < 4


def test_ctrl_c_answered_no_goes_on_and_with_no_one_to_answer_cancels(
    farm: RunningFarm, key: str, client_env: dict[str, str], tmp_path: Path
) -> None:
    proc, request_id = start_render(
        client_env, subprocess.PIPE, *LONG, "--json", "--out", str(tmp_path)
    )
    try:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write("n\n")
        proc.stdin.close()  # after this answer, nobody is left to answer
        proc.send_signal(signal.SIGINT)
        answered = proc.stderr.readline() + proc.stderr.readline()
        assert f"Cancel request {request_id}? [y/N]" in answered
        assert f"request {request_id} goes on" in answered
        status = api(farm, key, "GET", f"/v2/requests/{request_id}/status").json()
        assert status["status"] in ("QUEUED", "PROCESSING") and not status.get("cancelled")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # its output is a few lines: the pipes cannot fill up
        assert proc.stdout is not None
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_FAILED, stderr
    assert "no answer; cancelling" in stderr
    document = json.loads(stdout)
    assert document["request_id"] == request_id
    assert document["status"] == "FAILED" and document["cancelled"] is True
    final = api(farm, key, "GET", f"/v2/requests/{request_id}").json()
    assert final["status"] == "FAILED" and final["cancelled"] is True


def test_requests_show_and_cancel(farm: RunningFarm, key: str, client_env: dict[str, str]) -> None:
    # Queued behind nothing but long enough that the cancel finds it live.
    job = {"prompt": "a quiet harbour", "width": 512, "height": 512, "steps": 50}
    submitted = api(farm, key, "POST", "/v2/kolors", json=job | {"number_of_images": 4})
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["request_id"]

    shown = kolors_farm(client_env, "requests", "show", request_id, "--json")
    assert shown.returncode == EXIT_OK, shown.stderr
    assert json.loads(shown.stdout)["request_id"] == request_id
    assert json.loads(shown.stdout)["status"] in ("QUEUED", "PROCESSING")

    cancelled = kolors_farm(client_env, "requests", "cancel", request_id)
    assert cancelled.returncode == EXIT_OK, cancelled.stderr
    assert cancelled.stdout.startswith(f"request {request_id}: ")
    wait_for(
        lambda: api(farm, key, "GET", f"/v2/requests/{request_id}/status").status_code == 422,
        60,
        "the request to end",
    )
    again = kolors_farm(client_env, "requests", "cancel", request_id, "--json")
    assert again.returncode == EXIT_OK
    assert "already ended" in json.loads(again.stdout)["detail"]

    human = kolors_farm(client_env, "requests", "show", request_id)
    assert human.returncode == EXIT_OK, human.stderr
    assert f"request   {request_id}" in human.stdout
    assert "FAILED (cancelled)" in human.stdout and "a quiet harbour" in human.stdout
    document = json.loads(kolors_farm(client_env, "requests", "show", request_id, "--json").stdout)
    assert document["status"] == "FAILED" and document["cancelled"] is True
    assert document["parameters"]["steps"] == 50

    unknown = kolors_farm(client_env, "requests", "show", "no-such-request")
    assert unknown.returncode == EXIT_API and "HTTP 404" in unknown.stderr


def test_requests_list_pages_newest_first_and_filters_by_status(
    farm: RunningFarm, key: str, client_env: dict[str, str]
) -> None:
    # The module's earlier tests left completed and cancelled requests behind.
    everything = json.loads(kolors_farm(client_env, "requests", "list", "--json").stdout)
    listed = everything["requests"]
    assert len(listed) >= 4 and everything["next_cursor"] is None
    created = [item["created_at"] for item in listed]
    assert created == sorted(created, reverse=True)
    statuses = {item["status"] for item in listed}
    assert statuses == {"COMPLETED", "FAILED"}

    failed = kolors_farm(client_env, "requests", "list", "--status", "failed", "--json")
    assert failed.returncode == EXIT_OK, failed.stderr
    failed_ids = [item["request_id"] for item in json.loads(failed.stdout)["requests"]]
    assert failed_ids == [item["request_id"] for item in listed if item["status"] == "FAILED"]

    # One page at a time, following the cursor the table prints.
    seen: list[str] = []
    cursor: list[str] = []
    while True:
        page = kolors_farm(client_env, "requests", "list", "--limit", "2", *cursor)
        assert page.returncode == EXIT_OK, page.stderr
        rows = [line for line in page.stdout.splitlines() if re.match(r"^│ [0-9a-f]", line)]
        seen += [row.split("│")[1].strip() for row in rows]
        more = re.search(r"^more: --cursor (\S+)$", page.stdout, re.MULTILINE)
        if not more:
            break
        cursor = ["--cursor", more[1]]
    assert seen == [item["request_id"] for item in listed]

    table = kolors_farm(client_env, "requests", "list")
    assert "a slow render" in table.stdout and "FAILED (cancelled)" in table.stdout
    too_many = kolors_farm(client_env, "requests", "list", "--limit", "500")
    assert too_many.returncode == EXIT_API and "limit: " in too_many.stderr


def test_the_api_log_never_holds_the_key(farm: RunningFarm, key: str) -> None:
    log = farm.processes.log("api")
    assert "/v2/kolors" in log  # the access log saw this module's requests
    assert key not in log and key[10:] not in log


def test_render_waits_through_an_api_restart(
    farm: RunningFarm, client_env: dict[str, str], tmp_path: Path
) -> None:
    """Last in the module: the API comes back on the same port, logging to a new file."""
    proc, request_id = start_render(
        client_env, subprocess.DEVNULL, "a patient fox", "-n", "2", "--size", "512x512",
        "--steps", "20", "--format", "png", "--out", str(tmp_path),
    )  # fmt: skip
    try:
        farm.processes.kill("api", signal.SIGTERM)
        assert not answers_health(farm.url)
        port = farm.url.rsplit(":", 1)[1]
        farm.processes.supervisor.start(
            ChildSpec(
                "api-again",
                [sys.executable, "-m", "api", "--port", port],
                farm.processes.env,
                log_path=farm.processes.logs / "api-again.log",
            )
        )
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_OK, stderr
    assert f"cannot reach the farm at {farm.url}" in stderr and "retrying for up to" in stderr
    assert [Path(line).name for line in stdout.splitlines()] == [
        f"{request_id}-{seed}.png" for seed in (441234134, 441234135)
    ]
    assert answers_health(farm.url)


def answers_health(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
