"""Idempotency keys on both submit routes: a retried submission is the same request, held once.

Most tests run on both databases through the app. Concurrent duplicates go through a real
threaded HTTP server, so the requests race in the database as they would in production.
The synchronous route needs a render worker: it runs against one farm of real processes
(gunicorn, dispatcher, a CPU worker on the tiny checkpoint) on SQLite, since what is under
test there is the route's answer, and the key's SQL is the one the other tests run on both.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import make_server

from control.dispatcher import Dispatcher
from shared.accounts.ledger import grant_credits
from shared.celery_app import make_celery
from shared.db import transaction
from shared.jobs.idempotency import Claimed, claim_key, delete_expired_keys, submission_fingerprint
from shared.jobs.params import parse_params
from shared.models import IdempotencyKey, Job, LedgerEntry, LedgerKind, utcnow
from shared.settings import Settings
from tests.conftest import ApiUser, make_user, resources_for
from tests.farms import FarmFactory, RunningFarm
from tests.processes import wait_for

BODY: dict[str, Any] = {"prompt": "a red fox in snow", "width": 512, "height": 512, "steps": 4}
# The same parameters as form data, in another order, with a default spelled out.
SAME_AS_FORM = {
    "steps": "4",
    "height": "512",
    "cfg": "6",
    "prompt": "a red fox in snow",
    "width": "512",
}
DAY = timedelta(days=1)


def keyed(user: ApiUser, key: str, **extra: str) -> dict[str, str]:
    return {**user.headers, "Idempotency-Key": key, **extra}


def jobs_of(sessions: sessionmaker[Session], user: ApiUser) -> list[str]:
    with transaction(sessions) as session:
        return list(
            session.execute(select(Job.id).where(Job.user_id == user.principal.user_id)).scalars()
        )


def holds_of(sessions: sessionmaker[Session], user: ApiUser) -> list[str | None]:
    with transaction(sessions) as session:
        return list(
            session.execute(
                select(LedgerEntry.job_id).where(
                    LedgerEntry.user_id == user.principal.user_id,
                    LedgerEntry.kind == LedgerKind.HOLD.value,
                )
            ).scalars()
        )


def key_rows(sessions: sessionmaker[Session]) -> int:
    with transaction(sessions) as session:
        return session.execute(select(func.count()).select_from(IdempotencyKey)).scalar_one()


def test_a_repeat_is_the_same_request_with_no_new_hold(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    first = client.post("/v2/kolors", json=BODY, headers=keyed(alice, "order-1"))
    assert first.status_code == 202, first.get_json()
    assert "Idempotent-Replayed" not in first.headers
    request_id = first.get_json()["request_id"]
    balance = first.headers["x-remaining-credits"]
    assert Decimal(balance) < Decimal(10)

    # The same request as form data, keys in another order, a default made explicit.
    again = client.post("/v2/kolors", data=SAME_AS_FORM, headers=keyed(alice, "order-1"))
    assert again.status_code == 202, again.get_json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    assert again.headers["x-remaining-credits"] == balance

    assert jobs_of(sessions, alice) == [request_id]
    assert holds_of(sessions, alice) == [request_id]
    with transaction(sessions) as session:
        row = session.execute(select(IdempotencyKey)).scalar_one()
        assert (row.key, row.job_id, row.user_id) == (
            "order-1",
            request_id,
            alice.principal.user_id,
        )
        assert row.expires_at - row.created_at == DAY


def test_the_same_key_with_another_request_is_422(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    first = client.post("/v2/kolors", json=BODY, headers=keyed(alice, "k"))
    assert first.status_code == 202
    others = [
        ("/v2/kolors", {**BODY, "prompt": "a grey wolf"}, {}),
        ("/v2/kolors", {**BODY, "seed": 1}, {}),
        ("/v2/kolors", BODY, {"X-Deadline-Seconds": "600"}),
        ("/v1/kolors", BODY, {}),  # the route is part of the request
    ]
    for route, body, extra in others:
        answer = client.post(route, json=body, headers=keyed(alice, "k", **extra))
        assert answer.status_code == 422, (route, body, answer.get_json())
        assert answer.mimetype == "application/problem+json"
        problem = answer.get_json()
        assert problem["errors"] == [
            {
                "field": "Idempotency-Key",
                "rule": "idempotency_key_reused",
                "message": problem["errors"][0]["message"],
            }
        ]
    assert jobs_of(sessions, alice) == [first.get_json()["request_id"]]
    assert len(holds_of(sessions, alice)) == 1


def test_keys_belong_to_their_user(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    bob = make_user(sessions, "bob", 10_000)
    mine = client.post("/v2/kolors", json=BODY, headers=keyed(alice, "shared-name"))
    theirs = client.post("/v2/kolors", json=BODY, headers=keyed(bob, "shared-name"))
    assert mine.status_code == theirs.status_code == 202
    assert "Idempotent-Replayed" not in theirs.headers
    assert mine.get_json()["request_id"] != theirs.get_json()["request_id"]
    assert holds_of(sessions, bob) == [theirs.get_json()["request_id"]]
    # Bob's other body is his own business: no 422 from Alice's key.
    other = client.post("/v2/kolors", json={**BODY, "seed": 3}, headers=keyed(bob, "k2"))
    assert other.status_code == 202


@pytest.mark.parametrize(
    "key",
    ["x" * 256, "", "two words", "caf\u00e9", "tab\there"],
    ids=["too-long", "empty", "space", "latin-1", "tab"],
)
def test_a_bad_key_is_400_and_creates_nothing(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session], key: str
) -> None:
    for route in ("/v2/kolors", "/v1/kolors"):
        answer = client.post(route, json=BODY, headers=keyed(alice, key))
        assert answer.status_code == 400, (route, answer.get_json())
        assert answer.mimetype == "application/problem+json"
        (error,) = answer.get_json()["errors"]
        assert error["field"] == "Idempotency-Key"
        assert error["rule"] == "visible_ascii_1_to_255"
    assert jobs_of(sessions, alice) == []
    assert holds_of(sessions, alice) == []
    assert key_rows(sessions) == 0


def test_the_longest_key_and_a_quoted_key_are_accepted(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    longest = client.post("/v2/kolors", json=BODY, headers=keyed(alice, "~" * 255))
    quoted = client.post("/v2/kolors", json=BODY, headers=keyed(alice, '"8e03978e-40d5"'))
    assert longest.status_code == quoted.status_code == 202
    assert len(set(jobs_of(sessions, alice))) == 2
    twice = client.post(
        "/v2/kolors",
        json=BODY,
        headers=[*alice.headers.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    )
    # Sent twice, the values arrive joined ("a, b"): not one key.
    assert twice.status_code == 400
    assert twice.get_json()["errors"][0]["field"] == "Idempotency-Key"


def test_an_expired_key_names_a_new_request(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    first = client.post("/v2/kolors", json=BODY, headers=keyed(alice, "daily")).get_json()
    with transaction(sessions) as session:
        session.execute(update(IdempotencyKey).values(expires_at=utcnow() - timedelta(seconds=1)))
    # Expired, not yet cleaned up: new, and even another body is welcome.
    second = client.post("/v2/kolors", json={**BODY, "seed": 9}, headers=keyed(alice, "daily"))
    assert second.status_code == 202
    assert "Idempotent-Replayed" not in second.headers
    assert second.get_json()["request_id"] != first["request_id"]
    assert len(holds_of(sessions, alice)) == 2
    with transaction(sessions) as session:
        row = session.execute(select(IdempotencyKey)).scalar_one()
        assert row.job_id == second.get_json()["request_id"] and row.expires_at > utcnow()


def test_cleanup_deletes_expired_keys_in_bounded_batches(
    settings: Settings, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    user_id = alice.principal.user_id
    with transaction(sessions) as session:
        for index in range(5):  # claimed two days ago, expired one day ago
            claim_key(session, user_id, f"old-{index}", "0" * 64, utcnow() - 2 * DAY, DAY)
        claim_key(session, user_id, "live", "0" * 64, utcnow(), DAY)
    with transaction(sessions) as session:
        assert delete_expired_keys(session, utcnow(), batch=2) == 2
    assert key_rows(sessions) == 4

    # The dispatcher's periodic cleanup deletes the rest (one batch per cleanup).
    celery = make_celery(settings)
    try:
        Dispatcher(resources_for(settings, sessions), celery).run_pass()
    finally:
        celery.close()
    with transaction(sessions) as session:
        assert list(session.execute(select(IdempotencyKey.key)).scalars()) == ["live"]
        assert delete_expired_keys(session, utcnow()) == 0


def test_a_failed_submission_gives_its_key_back(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    poor = make_user(sessions, "poor", 10)  # 0.01 credit: not enough for one image
    refused = client.post("/v2/kolors", json=BODY, headers=keyed(poor, "retry-me"))
    assert refused.status_code == 406
    assert key_rows(sessions) == 0
    with transaction(sessions) as session:
        grant_credits(session, poor.principal.user_id, 10_000)
    accepted = client.post("/v2/kolors", json=BODY, headers=keyed(poor, "retry-me"))
    assert accepted.status_code == 202, accepted.get_json()
    assert "Idempotent-Replayed" not in accepted.headers
    assert jobs_of(sessions, poor) == [accepted.get_json()["request_id"]]


def test_a_key_being_created_is_409_and_an_abandoned_one_is_taken_over(
    client: FlaskClient, settings: Settings, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    digest = submission_fingerprint(
        "/v2/kolors",
        parse_params(BODY),
        None,
        float(settings.result_retention_s),
    )
    user_id = alice.principal.user_id
    with transaction(sessions) as session:
        busy = claim_key(session, user_id, "busy", digest, utcnow(), DAY)
        abandoned = claim_key(
            session, user_id, "abandoned", digest, utcnow() - timedelta(minutes=2), DAY
        )
    assert isinstance(busy, Claimed) and isinstance(abandoned, Claimed)

    in_progress = client.post("/v2/kolors", json=BODY, headers=keyed(alice, "busy"))
    assert in_progress.status_code == 409
    assert in_progress.mimetype == "application/problem+json"
    assert int(in_progress.headers["Retry-After"]) >= 1
    assert jobs_of(sessions, alice) == []

    # A claim a minute old without a job was left by a crash: the retry creates the request.
    taken_over = client.post("/v2/kolors", json=BODY, headers=keyed(alice, "abandoned"))
    assert taken_over.status_code == 202, taken_over.get_json()
    assert jobs_of(sessions, alice) == [taken_over.get_json()["request_id"]]


@pytest.fixture
def served(app: Flask) -> Iterator[str]:
    """The app on a real threaded HTTP server: concurrent requests really overlap."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def test_concurrent_duplicates_hold_once(
    served: str, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    threads = 8
    for round_ in range(2):
        key = f"burst-{round_}"
        start = threading.Barrier(threads)
        answers: list[httpx.Response] = []

        def submit(
            key: str = key,
            start: threading.Barrier = start,
            answers: list[httpx.Response] = answers,
        ) -> None:
            with httpx.Client(timeout=60) as http:
                start.wait()
                answers.append(
                    http.post(f"{served}/v2/kolors", json=BODY, headers=keyed(alice, key))
                )

        workers = [threading.Thread(target=submit) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert len(answers) == threads
        created = [a for a in answers if a.status_code == 202]
        assert {a.status_code for a in answers} <= {202, 409}, [a.text for a in answers]
        assert created, [a.text for a in answers]
        assert len({a.json()["request_id"] for a in created}) == 1
        assert sum("Idempotent-Replayed" not in a.headers for a in created) == 1
        for busy in (a for a in answers if a.status_code == 409):
            assert busy.headers["Retry-After"] == "1"
        # Once created, a retry always gets the request.
        retry = httpx.post(f"{served}/v2/kolors", json=BODY, headers=keyed(alice, key))
        assert retry.status_code == 202 and retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json()["request_id"] == created[0].json()["request_id"]

    jobs = jobs_of(sessions, alice)
    assert len(jobs) == 2
    assert sorted(holds_of(sessions, alice), key=str) == sorted(jobs)


# ---------------------------------------------------------------- the synchronous route

SYNC_BODY = {**BODY, "output_format": "png", "seed": 5}


@pytest.fixture(scope="module")
def farm(module_farms: FarmFactory) -> RunningFarm:
    return module_farms.start("idempotency")


@pytest.mark.e2e
def test_the_synchronous_route_answers_a_repeat_with_the_same_render(farm: RunningFarm) -> None:
    key = farm.processes.create_user("sync-caller", "10")
    headers = {"x-api-key": key, "Idempotency-Key": "render-once"}
    answers: list[httpx.Response] = []

    def render() -> None:
        answers.append(
            httpx.post(f"{farm.url}/v1/kolors", json=SYNC_BODY, headers=headers, timeout=120)
        )

    first = threading.Thread(target=render)
    first.start()

    def listed() -> list[dict[str, Any]] | None:
        page = httpx.get(f"{farm.url}/v2/requests", headers={"x-api-key": key}).json()
        requests: list[dict[str, Any]] = page["requests"]
        return requests or None

    # The repeat arrives once the first has created its request, rendering or done: it waits
    # on that request (or finds it finished) and answers its image, as the first does.
    (request,) = wait_for(listed, 60, "the first render's request")
    render()
    first.join(timeout=120)
    original = next(a for a in answers if "Idempotent-Replayed" not in a.headers)
    repeat = next(a for a in answers if a.headers.get("Idempotent-Replayed") == "true")
    for answer in (original, repeat):
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "image/png"
        assert answer.headers["x-request-id"] == request["request_id"]
    assert repeat.content == original.content

    # Asked as JSON, the repeat answers the same request in that shape.
    as_json = httpx.post(
        f"{farm.url}/v1/kolors",
        json=SYNC_BODY,
        headers={**headers, "Accept": "application/json"},
        timeout=120,
    )
    assert as_json.status_code == 200, as_json.text
    assert as_json.headers["Idempotent-Replayed"] == "true"
    assert as_json.json()["request_id"] == request["request_id"]

    # One request, charged once.
    page = httpx.get(f"{farm.url}/v2/requests", headers={"x-api-key": key}).json()
    assert [r["request_id"] for r in page["requests"]] == [request["request_id"]]
    credits = httpx.get(f"{farm.url}/v1/get-user-credits", headers={"x-api-key": key}).json()
    price = Decimal(512 * 512 * 4) / Decimal(1024 * 1024 * 25)  # the README's linear price
    charged = price.quantize(Decimal("0.001"), rounding=ROUND_CEILING)
    assert Decimal(credits["credits"]) == Decimal(10) - charged


def test_the_document_names_the_header_and_its_answers(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    for path in ("/v1/kolors", "/v2/kolors"):
        submit = document["paths"][path]["post"]
        headers = {p["name"]: p["schema"] for p in submit["parameters"] if p["in"] == "header"}
        assert headers["Idempotency-Key"]["maxLength"] == 255
        assert headers["Idempotency-Key"]["minLength"] == 1
        responses = submit["responses"]
        success = responses["200" if path == "/v1/kolors" else "202"]
        assert "Idempotent-Replayed" in success["headers"]
        assert responses["409"]["headers"]["Retry-After"]["required"] is True
        for status in ("409", "422"):
            assert list(responses[status]["content"]) == ["application/problem+json"]
        assert "Idempotency-Key" in responses["422"]["description"]
