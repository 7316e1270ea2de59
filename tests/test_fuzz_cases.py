"""What fuzzing the live OpenAPI document found, one test each, so none comes back.

A schemathesis run against `kolors-farm up` found: a 503 for an event id too large for
Redis; valid requests refused (an empty `cursor`, `Last-Event-ID: 0`, a form field
`webhook=null`); gunicorn's own HTML page for a too-long URL. It also met the 422s the
contract gives on purpose (a FAILED request's result, a reused Idempotency-Key), which
the document must list. The app's cases run on both databases; gunicorn's limits run
against the real server.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.server import HEADER_FIELD_LIMIT, REQUEST_LINE_LIMIT
from api.spec import PROBLEM_MEDIA_TYPE
from shared.accounts.users import create_user
from shared.db import transaction
from shared.migrate import migrate_database
from shared.models import Job
from tests.conftest import ApiUser
from tests.processes import FarmProcesses, farm_env

PROMPT = {"prompt": "a lighthouse at dusk", "width": 512, "height": 512, "steps": 2}
# The request and event ids of the run's finding: a 4-byte UTF-8 character, and a
# millisecond part above 2^64 (Redis refuses it, and the route said 503).
ODD_REQUEST_ID = "%F2%93%82%AB"
HUGE_EVENT_ID = "97352484322651856095-8"


def field_errors(answer: Any) -> list[tuple[str, str]]:
    """The (field, rule) pairs of a 400 problem."""
    assert answer.status_code == 400, answer.get_data(as_text=True)
    assert answer.mimetype == PROBLEM_MEDIA_TYPE
    return [(error["field"], error["rule"]) for error in answer.get_json()["errors"]]


def submit(client: FlaskClient, user: ApiUser, **kwargs: Any) -> str:
    """Queue a request (JSON or form, per `kwargs`); its id."""
    answer = client.post("/v2/kolors", headers=user.headers, **kwargs)
    assert answer.status_code == 202, answer.get_data(as_text=True)
    request_id: str = answer.get_json()["request_id"]
    return request_id


def documented_statuses(client: FlaskClient, path: str, method: str) -> set[str]:
    """The statuses the served document lists for one operation."""
    document = client.get("/openapi.json").get_json()
    return set(document["paths"][path][method]["responses"])


# ---------------------------------------------------------------- the event stream's ids


def test_an_event_id_too_large_for_redis_is_a_400_naming_the_header(
    client: FlaskClient, alice: ApiUser
) -> None:
    answer = client.get(
        f"/v2/requests/{ODD_REQUEST_ID}/events",
        headers=alice.headers | {"Last-Event-ID": HUGE_EVENT_ID},
    )
    assert field_errors(answer) == [("Last-Event-ID", "pattern")]
    # Each part may have up to 19 digits: one more is refused before Redis is asked.
    request_id = submit(client, alice, json=PROMPT)
    for bad in ("1-" + "9" * 20, "9" * 20 + "-1", "18446744073709551616-0"):
        answer = client.get(
            f"/v2/requests/{request_id}/events", headers=alice.headers | {"Last-Event-ID": bad}
        )
        assert field_errors(answer) == [("Last-Event-ID", "pattern")], bad


def test_a_query_event_id_too_large_for_redis_is_a_400_naming_the_parameter(
    client: FlaskClient, alice: ApiUser
) -> None:
    request_id = submit(client, alice, json=PROMPT)
    answer = client.get(
        f"/v2/requests/{request_id}/events?last_event_id=20530395-23113082593531156601",
        headers=alice.headers,
    )
    assert [field for field, _ in field_errors(answer)] == ["last_event_id"]


def test_the_document_states_the_event_id_rule_the_route_applies(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    events = document["paths"]["/v2/requests/{job_id}/events"]["get"]
    patterns = {
        p["name"]: p["schema"]["pattern"] for p in events["parameters"] if p["in"] != "path"
    }
    assert patterns == {
        "last_event_id": r"^(0|[0-9]{1,19}-[0-9]{1,19})$",
        "Last-Event-ID": r"^(0|[0-9]{1,19}-[0-9]{1,19})$",
    }


@pytest.mark.parametrize("resume", [{"headers": {"Last-Event-ID": "0"}}, {"query": "0"}])
def test_last_event_id_0_replays_the_whole_log(
    client: FlaskClient, alice: ApiUser, resume: dict[str, Any]
) -> None:
    request_id = submit(client, alice, json=PROMPT)
    assert (
        client.post(f"/v2/requests/{request_id}/cancel", headers=alice.headers).status_code == 200
    )
    url = f"/v2/requests/{request_id}/events"
    if "query" in resume:
        url += f"?last_event_id={resume['query']}"
    answer = client.get(url, headers=alice.headers | resume.get("headers", {}))
    assert answer.status_code == 200 and answer.mimetype == "text/event-stream"
    # The log holds the cancel's end: "0" replays it, as "0-0" does, and the stream ends.
    from_zero = answer.get_data(as_text=True)
    whole_log = client.get(
        f"/v2/requests/{request_id}/events?last_event_id=0-0", headers=alice.headers
    ).get_data(as_text=True)
    assert "event: completed" in from_zero
    assert from_zero.split("\n\n")[1].split("\n")[0] == whole_log.split("\n\n")[1].split("\n")[0]


def test_a_request_id_no_request_can_have_is_a_404_on_both_databases(
    client: FlaskClient, alice: ApiUser
) -> None:
    # PostgreSQL refuses a NUL in text: the query must not reach it (it answered 500).
    for path in (
        "/v2/requests/a%00b/events",
        "/v2/requests/a%00b/status",
        "/v2/requests/a%00b",
        f"/v2/requests/{ODD_REQUEST_ID}/events",
    ):
        answer = client.get(path, headers=alice.headers | {"Last-Event-ID": "0"})
        assert answer.status_code == 404, (path, answer.get_data(as_text=True))
        assert answer.mimetype == PROBLEM_MEDIA_TYPE


# ---------------------------------------------------------------- cursors


@pytest.mark.parametrize("path", ["/v2/requests", "/v1/usage", "/v1/admin/users"])
def test_an_empty_cursor_is_the_first_page(
    client: FlaskClient, sessions: sessionmaker[Session], path: str
) -> None:
    with transaction(sessions) as session:
        _, key = create_user(session, "root", "ops", 10_000, admin=True)
    headers = {"x-api-key": key}
    client.post("/v2/kolors", headers=headers, json=PROMPT)
    first = client.get(path, headers=headers)
    empty = client.get(f"{path}?cursor=", headers=headers)
    assert first.status_code == empty.status_code == 200, empty.get_data(as_text=True)
    assert empty.get_json() == first.get_json()
    parameters = client.get("/openapi.json").get_json()["paths"][path]["get"]["parameters"]
    cursor = next(p for p in parameters if p["name"] == "cursor")
    assert "empty: the first page" in cursor["description"]


def test_a_cursor_no_route_handed_out_is_still_a_400(client: FlaskClient, alice: ApiUser) -> None:
    answer = client.get("/v2/requests?cursor=bm90LWEtY3Vyc29y", headers=alice.headers)
    assert field_errors(answer) == [("cursor", "cursor")]


# ---------------------------------------------------------------- the webhook field


def webhook_of(sessions: sessionmaker[Session], request_id: str) -> str | None:
    with transaction(sessions) as session:
        return session.execute(select(Job.webhook_url).where(Job.id == request_id)).scalar_one()


@pytest.mark.parametrize(
    "body",
    [
        {"data": PROMPT | {"webhook": "null"}},
        {"data": PROMPT | {"webhook": ""}},
        {"json": PROMPT | {"webhook": None}},
        {"json": PROMPT | {"webhook": ""}},
    ],
    ids=["form-null", "form-empty", "json-null", "json-empty"],
)
def test_a_null_or_empty_webhook_means_no_webhook(
    client: FlaskClient, sessions: sessionmaker[Session], alice: ApiUser, body: dict[str, Any]
) -> None:
    request_id = submit(client, alice, **body)
    assert webhook_of(sessions, request_id) is None
    answer = client.get(f"/v2/requests/{request_id}/webhooks", headers=alice.headers)
    assert answer.status_code == 200 and answer.get_json()["webhook"] is None


def test_a_webhook_that_is_no_url_is_still_refused(client: FlaskClient, alice: ApiUser) -> None:
    for body in (
        {"data": PROMPT | {"webhook": "denominator"}},
        {"json": PROMPT | {"webhook": "0"}},
    ):
        answer = client.post("/v2/kolors", headers=alice.headers, **body)
        assert field_errors(answer) == [("webhook", "url_scheme")]


def test_the_document_says_what_no_webhook_looks_like(client: FlaskClient) -> None:
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    webhook = schemas["KolorsParams"]["properties"]["webhook"]
    assert {"type": "null"} in webhook["anyOf"]
    assert "null, empty, or `null`" in webhook["description"]


# ---------------------------------------------------------------- 422 by design, documented


def test_a_cancelled_requests_result_is_a_documented_422(
    client: FlaskClient, alice: ApiUser
) -> None:
    request_id = submit(client, alice, json=PROMPT)
    client.post(f"/v2/requests/{request_id}/cancel", headers=alice.headers)
    for path, route in (
        (f"/v2/requests/{request_id}", "/v2/requests/{job_id}"),
        (f"/v2/requests/{request_id}/status", "/v2/requests/{job_id}/status"),
    ):
        answer = client.get(path, headers=alice.headers)
        assert answer.status_code == 422 and answer.get_json()["status"] == "FAILED"
        assert "422" in documented_statuses(client, route, "get")


def test_a_reused_idempotency_key_is_a_documented_422(client: FlaskClient, alice: ApiUser) -> None:
    keyed = alice.headers | {"Idempotency-Key": "once"}
    assert client.post("/v2/kolors", headers=keyed, json=PROMPT).status_code == 202
    answer = client.post("/v2/kolors", headers=keyed, json=PROMPT | {"steps": 3})
    assert answer.status_code == 422 and answer.mimetype == PROBLEM_MEDIA_TYPE
    assert answer.get_json()["errors"][0]["rule"] == "idempotency_key_reused"
    for path in ("/v2/kolors", "/v1/kolors"):
        assert "422" in documented_statuses(client, path, "post")


# ---------------------------------------------------------------- gunicorn's own refusals


@pytest.fixture
def gunicorn_api(tmp_path: Path, redis_url: str) -> Any:
    """The API under gunicorn, as `kolors-farm up` runs it, on a SQLite file."""
    database_url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate_database(database_url)
    env = farm_env(tmp_path / "var", database_url, redis_url, tmp_path / "no-model")
    processes = FarmProcesses(env=env, logs=tmp_path / "logs")
    try:
        yield processes.start_api()
    finally:
        processes.stop_all()


def assert_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    """`answer` is a problem+json document with `status`; its body."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body: dict[str, Any] = answer.json()
    assert body["status"] == status and body["error"] == body["detail"] and body["title"]
    return body


def test_gunicorn_answers_what_it_refuses_with_a_documented_problem(gunicorn_api: str) -> None:
    # A URL just within the limit reaches the app (which wants a key); one beyond is a 414.
    fits = "/v2/requests?cursor=" + "a" * (REQUEST_LINE_LIMIT - 100)
    assert_problem(httpx.get(gunicorn_api + fits, timeout=30), 401)
    too_long = "/v2/requests?cursor=" + "a" * REQUEST_LINE_LIMIT
    body = assert_problem(httpx.get(gunicorn_api + too_long, timeout=30), 414)
    assert str(REQUEST_LINE_LIMIT) in body["detail"]
    big_header = {"x-api-key": "k" * (HEADER_FIELD_LIMIT + 1)}
    assert_problem(httpx.get(gunicorn_api + "/v1/me", headers=big_header, timeout=30), 431)
    many_headers = {f"x-extra-{n}": "1" for n in range(120)}
    assert_problem(httpx.get(gunicorn_api + "/healthz", headers=many_headers, timeout=30), 431)

    # A request that is not HTTP at all: gunicorn's 400, in the same words as the app's.
    host, port = gunicorn_api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert f"Content-Type: {PROBLEM_MEDIA_TYPE}".encode() in head
    assert httpx.Response(400, content=payload).json()["status"] == 400

    # Every operation lists these answers.
    document = httpx.get(gunicorn_api + "/openapi.json", timeout=30).json()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status in ("400", "414", "431"):
                content = operation["responses"][status]["content"]
                assert list(content) == [PROBLEM_MEDIA_TYPE], (method, path, status)


def test_a_user_or_tenant_name_no_account_can_have_is_a_404_on_both_databases(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    with transaction(sessions) as session:
        _, key = create_user(session, "root", "ops", 10_000, admin=True)
    headers = {"x-api-key": key}
    grant = client.post("/v1/admin/users/a%00b/credits", headers=headers, json={"credits": "1"})
    secret = client.get("/v1/admin/tenants/a%00b/webhook-secret", headers=headers)
    for answer in (grant, secret):
        assert answer.status_code == 404, answer.get_data(as_text=True)
        assert answer.mimetype == PROBLEM_MEDIA_TYPE
