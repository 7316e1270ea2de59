"""The HTTP API on real SQLite/PostgreSQL and a real Redis (no worker: jobs stay queued)."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.accounts.ledger import ledger_balance
from shared.db import transaction
from shared.jobs.transitions import claim_job, fail_job
from shared.models import Job, LedgerEntry
from shared.scheduling.fleet import (
    DISPATCH_LOCK_KEY,
    DISPATCH_WAKE_KEY,
    record_heartbeat,
    record_render_speed,
)
from shared.settings import Settings
from tests.conftest import ApiUser, make_user, release_job


def dispatcher_wakes(settings: Settings) -> int:
    """Wake-ups waiting for the dispatcher (the API's only message on submit)."""
    length: int = redis.Redis.from_url(settings.require_redis_url()).llen(DISPATCH_WAKE_KEY)
    return length


def job_count(sessions: sessionmaker[Session]) -> int:
    with transaction(sessions) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def submit(client: FlaskClient, user: ApiUser, **params: Any) -> dict[str, Any]:
    response = client.post("/v2/kolors", json={"prompt": "a fox", **params}, headers=user.headers)
    assert response.status_code == 202, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def test_async_submit_returns_absolute_urls_and_wakes_the_dispatcher(
    client: FlaskClient, alice: ApiUser, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    body = submit(client, alice, width=512, height=512)
    job_id = body["request_id"]
    assert body["status"] == "QUEUED"
    assert body["status_url"] == f"http://localhost/v2/requests/{job_id}/status"
    assert body["response_url"] == f"http://localhost/v2/requests/{job_id}"
    assert body["poll_url"] == body["status_url"]
    assert dispatcher_wakes(settings) == 1
    with transaction(sessions) as session:
        job = session.get_one(Job, job_id)
        # Committed and waiting its turn: only the dispatcher releases it to the workers.
        assert job.state == "QUEUED" and job.released_at is None


def test_public_base_url_is_used_for_links(settings: Settings, alice: ApiUser) -> None:
    from api.app import create_app

    app = create_app(settings.model_copy(update={"public_base_url": "https://farm.example/"}))
    body = submit(app.test_client(), alice)
    assert body["status_url"].startswith("https://farm.example/v2/requests/")


def test_form_data_is_accepted(client: FlaskClient, alice: ApiUser) -> None:
    response = client.post(
        "/v2/kolors", data={"prompt": "a fox", "steps": "10", "seed": "7"}, headers=alice.headers
    )
    assert response.status_code == 202
    result = client.get(
        f"/v2/requests/{response.get_json()['request_id']}", headers=alice.headers
    ).get_json()
    assert result["parameters"]["steps"] == 10
    assert result["parameters"]["seed"] == 7


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "steps": 100}, "steps"),
        ({"prompt": "x", "scheduler": "Bogus"}, "scheduler"),
        ({"prompt": "x", "output_format": "bmp"}, "output_format"),
        ({"prompt": "x", "width": 500}, "width"),
        ({"steps": 10}, "prompt"),
    ],
)
@pytest.mark.parametrize("route", ["/v1/kolors", "/v2/kolors"])
def test_bad_input_is_400_naming_the_field_and_leaves_no_trace(
    client: FlaskClient,
    alice: ApiUser,
    sessions: sessionmaker[Session],
    settings: Settings,
    route: str,
    body: dict[str, Any],
    field: str,
) -> None:
    response = client.post(route, json=body, headers=alice.headers)
    assert response.status_code == 400
    error = response.get_json()
    assert error["error"].startswith(f"{field}:")
    assert error["errors"][0]["field"] == field and error["errors"][0]["rule"]
    assert response.headers["x-remaining-credits"] == "10"
    assert job_count(sessions) == 0
    assert dispatcher_wakes(settings) == 0


def test_non_object_json_body_is_400(client: FlaskClient, alice: ApiUser) -> None:
    for data in ("[1, 2]", "{not json"):
        response = client.post(
            "/v2/kolors", data=data, content_type="application/json", headers=alice.headers
        )
        assert response.status_code == 400
        assert response.get_json()["error"].startswith("body:")


def test_body_too_large_is_413_json(
    client: FlaskClient, alice: ApiUser, settings: Settings
) -> None:
    prompt = "x" * (settings.max_body_bytes + 1)
    response = client.post("/v2/kolors", data={"prompt": prompt}, headers=alice.headers)
    assert response.status_code == 413
    assert response.get_json()["error"] == "Request body too large"


@pytest.mark.parametrize(
    "headers", [{}, {"x-api-key": "kf_wrong"}, {"Authorization": "Bearer kf_wrong"}]
)
def test_missing_or_bad_key_is_401(
    client: FlaskClient, headers: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    response = client.post("/v2/kolors", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert "API key" in response.get_json()["error"]
    assert "x-remaining-credits" not in response.headers
    assert job_count(sessions) == 0


def test_bearer_token_authenticates(client: FlaskClient, alice: ApiUser) -> None:
    response = client.get("/v1/get-user-credits", headers={"Authorization": f"Bearer {alice.key}"})
    assert response.status_code == 200
    assert response.get_json() == {"credits": "10"}


def test_not_enough_credits_is_406_with_no_job(
    client: FlaskClient, sessions: sessionmaker[Session], settings: Settings
) -> None:
    poor = make_user(sessions, "poor", 999)
    response = client.post("/v2/kolors", json={"prompt": "x"}, headers=poor.headers)
    assert response.status_code == 406
    assert response.get_json()["error"] == "Not enough credits"
    assert response.headers["x-remaining-credits"] == "0.999"
    assert job_count(sessions) == 0
    assert dispatcher_wakes(settings) == 0


def test_credits_header_tracks_the_ledger(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    response = client.post(
        "/v2/kolors",
        json={"prompt": "x", "width": 512, "height": 512, "number_of_images": 2},
        headers=alice.headers,
    )
    assert response.headers["x-remaining-credits"] == "9.5"
    credits = client.get("/v1/get-user-credits", headers=alice.headers)
    assert credits.get_json() == {"credits": "9.5"}
    assert credits.headers["x-remaining-credits"] == "9.5"
    with transaction(sessions) as session:
        assert ledger_balance(session, alice.principal.user_id) == 9500


def test_status_of_a_queued_job_reports_position(client: FlaskClient, alice: ApiUser) -> None:
    first = submit(client, alice)["request_id"]
    second = submit(client, alice)["request_id"]
    assert (
        client.get(f"/v2/requests/{first}/status", headers=alice.headers).get_json()[
            "queue_position"
        ]
        == 0
    )
    status = client.get(f"/v2/requests/{second}/status", headers=alice.headers)
    assert status.status_code == 200
    body = status.get_json()
    assert body["status"] == "QUEUED"
    assert body["queue_position"] == 1
    assert body["progress"] == {"images_done": 0, "images": 1, "step": 0, "steps": 25}


def test_running_job_is_processing(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    from datetime import timedelta

    job_id = submit(client, alice)["request_id"]
    with transaction(sessions) as session:
        claim_job(session, release_job(session, job_id), "w", timedelta(minutes=1))
    assert (
        client.get(f"/v2/requests/{job_id}/status", headers=alice.headers).get_json()["status"]
        == "PROCESSING"
    )


def test_failed_job_is_served_with_422_and_error(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    job_id = submit(client, alice)["request_id"]
    with transaction(sessions) as session:
        fail_job(session, job_id, "The render failed on the worker")
    for path in (f"/v2/requests/{job_id}/status", f"/v2/requests/{job_id}"):
        response = client.get(path, headers=alice.headers)
        assert response.status_code == 422
        assert response.get_json()["status"] == "FAILED"
        assert response.get_json()["error"] == "The render failed on the worker"
    assert response.headers["x-remaining-credits"] == "10"


def test_cancel_of_queued_job_reports_failed_cancelled_and_refunds(
    client: FlaskClient, alice: ApiUser
) -> None:
    job_id = submit(client, alice)["request_id"]
    first = client.delete(f"/v2/requests/{job_id}", headers=alice.headers)
    assert first.status_code == 200
    assert first.get_json()["cancelled"] is True
    assert first.headers["x-remaining-credits"] == "10"
    again = client.post(f"/v2/requests/{job_id}/cancel", headers=alice.headers)
    assert again.status_code == 200
    assert "already ended" in again.get_json()["detail"]
    status = client.get(f"/v2/requests/{job_id}/status", headers=alice.headers)
    assert status.status_code == 422
    assert status.get_json()["status"] == "FAILED" and status.get_json()["cancelled"] is True


def test_another_tenants_job_is_404_but_a_teammates_is_visible(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    job_id = submit(client, alice)["request_id"]
    mallory = make_user(sessions, "mallory", 1000)
    teammate = make_user(sessions, "bob", 1000, tenant="alice")
    for method, path in (
        ("get", f"/v2/requests/{job_id}/status"),
        ("get", f"/v2/requests/{job_id}"),
        ("get", f"/v2/requests/{job_id}/images/0"),
        ("delete", f"/v2/requests/{job_id}"),
    ):
        response = getattr(client, method)(path, headers=mallory.headers)
        assert response.status_code == 404, path
        assert response.get_json()["error"] == f"No request with id {job_id!r}"
    assert client.get(f"/v2/requests/{job_id}/status", headers=teammate.headers).status_code == 200
    unknown = client.get("/v2/requests/nope/status", headers=alice.headers)
    assert unknown.status_code == 404


def test_unknown_route_and_wrong_method_are_json(client: FlaskClient) -> None:
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.get_json()["error"] == "Not found"
    wrong = client.get("/v1/kolors")
    assert wrong.status_code == 405 and wrong.get_json()["error"] == "Method not allowed"
    assert "POST" in wrong.headers["Allow"]


def test_api_keys_are_stored_hashed(alice: ApiUser, sessions: sessionmaker[Session]) -> None:
    from shared.models import ApiKey

    with transaction(sessions) as session:
        stored = session.execute(select(ApiKey.key_hash, ApiKey.prefix)).one()
    assert alice.key not in stored.key_hash
    assert len(stored.key_hash) == 64 and alice.key.startswith(stored.prefix)


def test_sync_route_times_out_with_504_when_no_worker_runs(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    response = client.post("/v1/kolors", json={"prompt": "x"}, headers=alice.headers)
    assert response.status_code == 504
    body = response.get_json()
    assert body["status_url"].endswith(f"/v2/requests/{body['request_id']}/status")
    with transaction(sessions) as session:
        assert session.get_one(Job, body["request_id"]).state == "QUEUED"


def test_submission_is_kept_while_redis_is_unreachable(
    settings: Settings, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    from api.app import create_app

    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    app: Flask = create_app(broken)
    response = app.test_client().post("/v2/kolors", json={"prompt": "x"}, headers=alice.headers)
    # SQL is the source of truth: the job waits there until the dispatcher can publish it.
    assert response.status_code == 202
    with transaction(sessions) as session:
        job = session.execute(select(Job)).scalar_one()
        assert job.state == "QUEUED"
        assert ledger_balance(session, alice.principal.user_id) == 9_000
        kinds = session.scalars(select(LedgerEntry.kind).where(LedgerEntry.job_id == job.id))
        assert list(kinds) == ["hold"]


def test_synchronous_wait_survives_an_unreachable_redis(
    settings: Settings, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    from api.app import create_app

    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0", "sync_timeout_s": 1})
    response = (
        create_app(broken)
        .test_client()
        .post("/v1/kolors", json={"prompt": "x"}, headers=alice.headers)
    )
    # Not a 503: the job is queued and will run, so the client is told to poll, not to retry.
    assert response.status_code == 504
    body = response.get_json()
    assert body["status_url"].endswith(f"/v2/requests/{body['request_id']}/status")
    with transaction(sessions) as session:
        assert session.get_one(Job, body["request_id"]).state == "QUEUED"


def test_health_and_readiness(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "redis": "ok"}


def test_readiness_fails_when_redis_is_down(settings: Settings) -> None:
    from api.app import create_app

    app = create_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["ready"] is False
    assert ready.get_json()["checks"]["redis"].startswith("unavailable")


def test_openapi_document_uses_the_one_schema(client: FlaskClient) -> None:
    from shared.jobs.params import SCHEDULERS

    document = client.get("/openapi.json").get_json()
    params = document["components"]["schemas"]["KolorsParams"]["properties"]
    assert params["steps"]["maximum"] == 50 and params["steps"]["default"] == 25
    assert tuple(params["scheduler"]["enum"]) == SCHEDULERS
    assert {
        "/v1/kolors",
        "/v2/kolors",
        "/v2/requests/{job_id}/status",
        "/v1/get-user-credits",
    } <= set(document["paths"])


def position(client: FlaskClient, user: ApiUser, job_id: str) -> int:
    body = client.get(f"/v2/requests/{job_id}/status", headers=user.headers).get_json()
    result: int = body["queue_position"]
    return result


def test_queue_position_follows_the_fair_share_order(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    bob = make_user(sessions, "bob", 10_000)
    alices = [submit(client, alice)["request_id"] for _ in range(4)]
    bobs = submit(client, bob)["request_id"]
    # Bob's one job goes second, not fifth: tenants alternate.
    assert [position(client, alice, job) for job in alices] == [0, 2, 3, 4]
    assert position(client, bob, bobs) == 1


def test_eta_comes_from_measured_worker_speed(
    client: FlaskClient, alice: ApiUser, settings: Settings
) -> None:
    first = submit(client, alice)["request_id"]  # 1024x1024, 25 steps: 25 work units
    second = submit(client, alice)["request_id"]
    body = client.get(f"/v2/requests/{second}/status", headers=alice.headers).get_json()
    assert body["eta_seconds"] is None  # no worker has measured its speed yet
    client_redis = redis.Redis.from_url(settings.require_redis_url())
    record_heartbeat(client_redis, "w1", {}, ttl_s=60)
    record_render_speed(client_redis, "w1", 0.1)  # 0.1 s per work unit
    body = client.get(f"/v2/requests/{second}/status", headers=alice.headers).get_json()
    assert body["eta_seconds"] == 5.0  # the first job's 2.5 s, then its own 2.5 s
    body = client.get(f"/v2/requests/{first}/status", headers=alice.headers).get_json()
    assert body["eta_seconds"] == 2.5


def test_too_many_live_jobs_is_429_and_leaves_nothing(
    settings: Settings, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    from api.app import create_app

    client = create_app(settings.model_copy(update={"max_queued_per_user": 2})).test_client()
    submit(client, alice)
    submit(client, alice)
    response = client.post("/v2/kolors", json={"prompt": "x"}, headers=alice.headers)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) > 0
    assert "2 requests queued or running" in response.get_json()["error"]
    assert response.headers["x-remaining-credits"] == "8"
    assert job_count(sessions) == 2
    with transaction(sessions) as session:
        assert ledger_balance(session, alice.principal.user_id) == 8_000


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf", "86401"])
def test_bad_deadline_header_is_400(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session], value: str
) -> None:
    response = client.post(
        "/v2/kolors",
        json={"prompt": "x"},
        headers=alice.headers | {"X-Deadline-Seconds": value},
    )
    assert response.status_code == 400
    assert response.get_json()["errors"][0]["field"] == "X-Deadline-Seconds"
    assert job_count(sessions) == 0


def test_deadline_header_sets_the_jobs_deadline(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    job_id = submit_with_headers(client, alice, {"X-Deadline-Seconds": "90"})
    with transaction(sessions) as session:
        job = session.get_one(Job, job_id)
        assert job.deadline_at is not None
        assert abs((job.deadline_at - job.created_at).total_seconds() - 90) < 1


def submit_with_headers(client: FlaskClient, user: ApiUser, headers: dict[str, str]) -> str:
    response = client.post("/v2/kolors", json={"prompt": "x"}, headers=user.headers | headers)
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["request_id"]
    return job_id


def test_readiness_names_the_active_dispatcher(client: FlaskClient, settings: Settings) -> None:
    assert client.get("/readyz").get_json()["dispatcher"] is None
    redis.Redis.from_url(settings.require_redis_url()).set(DISPATCH_LOCK_KEY, "host:42")
    assert client.get("/readyz").get_json()["dispatcher"] == "host:42"
