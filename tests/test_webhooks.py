"""Webhooks on both databases, in process: fields, the URL guard, the outbox, secrets, delivery.

The delivery itself is the real function the Celery task runs, against a real
HTTP receiver on loopback; tests/test_webhooks_farm.py runs it in its worker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.app import create_app
from control.deliveries import deliver
from shared.db import read_only, transaction
from shared.jobs.params import parse_params
from shared.jobs.transitions import claim_job, fail_job, record_image
from shared.models import (
    DisabledWebhook,
    Job,
    LedgerEntry,
    User,
    WebhookAttempt,
    WebhookDelivery,
    utcnow,
)
from shared.settings import Settings
from shared.webhooks.outbox import Claim, claim_due, due_read
from shared.webhooks.secrets import (
    rotate_secret,
    sign,
    signing_secrets,
    tenant_secret,
    tenant_secret_by_name,
)
from shared.webhooks.urls import Target, WebhookRefused, check_url_syntax, resolve_target
from tests.conftest import ApiUser, make_job, make_user, release_job, resources_for
from tests.test_history import plan
from tests.webhook_receiver import Receiver, running_receiver

PUBLIC = "https://1.1.1.1/hook"  # a global address: passes the guard, never called here


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as receiver:
        yield receiver


@pytest.fixture
def loopback_settings(settings: Settings) -> Settings:
    """The farm's settings with loopback allowed and a short retry schedule."""
    return settings.model_copy(
        update={
            "webhook_allow_nets": "127.0.0.0/8",
            "webhook_backoff_s": "0.2,0.2",
            "webhook_timeout_s": 2.0,
            "public_base_url": "https://farm.example",
        }
    )


@pytest.fixture
def loopback_app(loopback_settings: Settings) -> Iterator[Flask]:
    app = create_app(loopback_settings)
    yield app
    app.extensions["kolors_farm"].engine.dispose()


def _count(sessions: sessionmaker[Session], model: type[object]) -> int:
    with read_only(sessions) as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


# ---------------------------------------------------------------- submission


def test_webhook_fields_are_stored_and_are_not_rendering_inputs(
    loopback_app: Flask, sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    client = loopback_app.test_client()
    asked = {"prompt": "a fox", "webhook": PUBLIC, "webhook_events_filter": ["start", "completed"]}
    as_json = client.post("/v2/kolors", json=asked, headers=alice.headers)
    repeated = client.post(
        "/v2/kolors",
        data={"prompt": "fox", "webhook": PUBLIC, "webhook_events_filter": ["completed", "start"]},
        headers=alice.headers,
    )
    comma = client.post(
        "/v2/kolors",
        data={"prompt": "a fox", "webhook": PUBLIC, "webhook_events_filter": "start,completed"},
        headers=alice.headers,
    )
    default = client.post(
        "/v2/kolors", json={"prompt": "a fox", "webhook": PUBLIC}, headers=alice.headers
    )
    none = client.post("/v2/kolors", json={"prompt": "a fox"}, headers=alice.headers)
    ids = [r.get_json()["request_id"] for r in (as_json, repeated, comma, default, none)]
    with read_only(sessions) as session:
        jobs = [session.get_one(Job, job_id) for job_id in ids]
    assert [(j.webhook_url, j.webhook_events) for j in jobs] == [
        (PUBLIC, "start,completed"),
        (PUBLIC, "start,completed"),
        (PUBLIC, "start,completed"),
        (PUBLIC, "completed"),
        (None, None),
    ]
    for job in jobs:
        assert "webhook" not in job.params and "webhook_events_filter" not in job.params


@pytest.mark.parametrize(
    ("fields", "field", "rule"),
    [
        ({"webhook": "http://127.0.0.1:9/hook"}, "webhook", "url_forbidden_address"),
        ({"webhook": "http://localhost/hook"}, "webhook", "url_forbidden_address"),
        ({"webhook": "http://[::1]/hook"}, "webhook", "url_forbidden_address"),
        ({"webhook": "http://10.1.2.3/hook"}, "webhook", "url_forbidden_address"),
        ({"webhook": "http://169.254.169.254/latest/"}, "webhook", "url_forbidden_address"),
        ({"webhook": "http://[::ffff:169.254.169.254]/"}, "webhook", "url_forbidden_address"),
        ({"webhook": "ftp://example.com/hook"}, "webhook", "url_scheme"),
        ({"webhook": "https://user:pw@example.com/hook"}, "webhook", "url_credentials"),
        ({"webhook": "http:///nohost"}, "webhook", "url_host"),
        ({"webhook": PUBLIC, "webhook_events_filter": ["finished"]}, "webhook_events_filter.0",
         "literal_error"),
        ({"webhook": PUBLIC, "webhook_events_filter": []}, "webhook_events_filter", "too_short"),
    ],
)  # fmt: skip
def test_bad_webhook_input_is_a_400_that_creates_nothing(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    fields: dict[str, object],
    field: str,
    rule: str,
) -> None:
    ledger_before = _count(sessions, LedgerEntry)
    answer = client.post("/v2/kolors", json={"prompt": "a fox", **fields}, headers=alice.headers)
    assert answer.status_code == 400
    problem = answer.get_json()
    assert {"field": field, "rule": rule} == {k: problem["errors"][0][k] for k in ("field", "rule")}
    assert _count(sessions, Job) == 0
    assert _count(sessions, LedgerEntry) == ledger_before
    assert client.get("/v1/get-user-credits", headers=alice.headers).get_json()["credits"] == "10"


def test_the_allow_list_admits_an_internal_network(loopback_app: Flask, alice: ApiUser) -> None:
    answer = loopback_app.test_client().post(
        "/v2/kolors",
        json={"prompt": "a fox", "webhook": "http://127.0.0.1:9/hook"},
        headers=alice.headers,
    )
    assert answer.status_code == 202


def test_targets_connect_to_the_checked_address_with_the_url_s_host() -> None:
    target = Target("https://hooks.example.com/a/b?c=1", "https", "hooks.example.com", 443, "::2")
    assert target.connect_url == "https://[::2]:443/a/b?c=1"
    assert target.host_header == "hooks.example.com"
    plain = Target("http://h.example:8080", "http", "h.example", 8080, "1.2.3.4")
    assert plain.connect_url == "http://1.2.3.4:8080/"
    assert plain.host_header == "h.example:8080"
    with pytest.raises(WebhookRefused) as refused:
        resolve_target("http://localhost:8080/x", [])
    assert refused.value.rule == "url_forbidden_address"
    with pytest.raises(WebhookRefused):
        check_url_syntax("http://example.com/" + "a" * 3000)


# ---------------------------------------------------------------- the outbox


def _job(
    sessions: sessionmaker[Session], user: ApiUser, webhook: str | None, events: str = "completed"
) -> str:
    params = parse_params(
        {"prompt": "a fox", "width": 512, "height": 512, "steps": 2}
        | ({"webhook": webhook, "webhook_events_filter": events} if webhook else {})
    )
    return make_job(sessions, user, params).id


def _deliveries(sessions: sessionmaker[Session], job_id: str) -> list[tuple[str, str]]:
    with read_only(sessions) as session:
        rows = session.execute(
            select(WebhookDelivery.event, WebhookDelivery.state)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.created_at)
        ).all()
    return [(row.event, row.state) for row in rows]


def test_outbox_rows_commit_with_the_start_and_the_end(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    both = _job(sessions, alice, PUBLIC, "start,completed")
    only_end = _job(sessions, alice, PUBLIC)
    only_start = _job(sessions, alice, PUBLIC, "start")
    silent = _job(sessions, alice, None)
    for job_id in (both, only_end, only_start, silent):
        with transaction(sessions) as session:
            release_job(session, job_id)
            spec = claim_job(session, job_id, "w", timedelta(seconds=60))
        assert spec is not None
        assert _deliveries(sessions, job_id) == (
            [("start", "pending")] if job_id in (both, only_start) else []
        )
        with transaction(sessions) as session:
            record_image(
                session,
                job_id,
                spec.attempt,
                0,
                seed=spec.seed,
                storage_key=f"k/{job_id}",
                content_type="image/webp",
                size_bytes=1,
                finish=True,
            )
    assert _deliveries(sessions, both) == [("start", "pending"), ("completed", "pending")]
    assert _deliveries(sessions, only_end) == [("completed", "pending")]
    assert _deliveries(sessions, only_start) == [("start", "pending")]
    assert _deliveries(sessions, silent) == []
    # A job that ends without a render (failed in line) still sends `completed`.
    failed = _job(sessions, alice, PUBLIC)
    with transaction(sessions) as session:
        assert fail_job(session, failed, "boom")
    assert _deliveries(sessions, failed) == [("completed", "pending")]


# ---------------------------------------------------------------- secrets


def test_secrets_are_standard_and_both_sign_during_a_rotation(
    sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    tenant = alice.principal.tenant_id
    with transaction(sessions) as session:
        first = tenant_secret_by_name(session, "alice")
        assert tenant_secret(session, tenant) == first  # created once
    assert first.startswith("whsec_") and len(first) >= len("whsec_") + 32
    with transaction(sessions) as session:
        second = rotate_secret(session, "alice")
        both = signing_secrets(session, tenant)
    assert second != first and both == [second, first]
    stamp = utcnow()
    body = '{"status":"COMPLETED"}'
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(stamp.timestamp())),
        "webhook-signature": sign(both, "msg_1", stamp, body),
    }
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (first, second):
        assert Webhook(secret).verify(body, headers) == {"status": "COMPLETED"}
    with transaction(sessions) as session:  # 24 hours later
        session.execute(
            update(WebhookDelivery.metadata.tables["webhook_secrets"])
            .where(WebhookDelivery.metadata.tables["webhook_secrets"].c.secret == first)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        assert signing_secrets(session, tenant) == [second]


# ---------------------------------------------------------------- delivery


def _claim(sessions: sessionmaker[Session], job_id: str) -> Claim:
    with transaction(sessions) as session:
        (delivery_id,) = session.execute(
            select(WebhookDelivery.id).where(WebhookDelivery.job_id == job_id)
        ).scalars()
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )
        claims = claim_due(session, timedelta(seconds=30))
        claims = [claim for claim in claims if claim.delivery_id == delivery_id]
    assert len(claims) == 1
    return claims[0]


def _ended_job(sessions: sessionmaker[Session], user: ApiUser, url: str) -> str:
    job_id = _job(sessions, user, url)
    with transaction(sessions) as session:
        fail_job(session, job_id, "boom")
    return job_id


def test_deliveries_retry_fail_disable_and_redeliver(
    loopback_settings: Settings,
    loopback_app: Flask,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    receiver: Receiver,
) -> None:
    resources = resources_for(loopback_settings, sessions)
    http = httpx.Client(timeout=2, follow_redirects=False, trust_env=False)
    api = loopback_app.test_client()
    flaky = _ended_job(sessions, alice, receiver.script("/flaky", "500", "500", "200"))
    bad = _ended_job(sessions, alice, receiver.script("/bad", "400"))
    gone = _ended_job(sessions, alice, receiver.script("/gone", "410", "200"))
    states = {
        job_id: deliver(resources, http, claim.delivery_id, claim.token)
        for job_id in (flaky, bad, gone)
        for claim in [_claim(sessions, job_id)]
    }
    assert states == {flaky: "pending", bad: "failed", gone: "disabled"}
    # A stale claim (a duplicate message) sends nothing.
    stale = _claim(sessions, flaky)
    assert deliver(resources, http, stale.delivery_id, stale.token) == "pending"
    assert deliver(resources, http, stale.delivery_id, stale.token) is None
    assert len(receiver.at("/flaky")) == 2
    # The 500s were retried on the schedule: this claim gets the 200.
    again = _claim(sessions, flaky)
    assert deliver(resources, http, again.delivery_id, again.token) == "delivered"
    first, *_, last = receiver.at("/flaky")
    assert first.headers["webhook-id"] == last.headers["webhook-id"] == again.delivery_id
    with transaction(sessions) as session:
        secret = tenant_secret(session, alice.principal.tenant_id)
    body = Webhook(secret).verify(last.body, last.headers)
    assert body["request_id"] == flaky and body["status"] == "FAILED"
    log = api.get(f"/v2/requests/{flaky}/webhooks", headers=alice.headers).get_json()
    (delivery,) = log["deliveries"]
    assert delivery["state"] == "delivered" and delivery["event"] == "completed"
    assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 500, 200]
    assert delivery["attempt_log"][0]["error"].startswith("HTTP 500: xxx")
    assert len(delivery["attempt_log"][0]["error"]) <= 500
    # The 400 is final; the 410 disabled the URL for the tenant: the next one is skipped.
    assert len(receiver.at("/bad")) == 1
    skipped = _ended_job(sessions, alice, receiver.url("/gone"))
    claim = _claim(sessions, skipped)
    assert deliver(resources, http, claim.delivery_id, claim.token) == "disabled"
    assert len(receiver.at("/gone")) == 1
    assert _count(sessions, DisabledWebhook) == 1
    # Redeliver: the URL is enabled again and the latest delivery goes back to pending.
    redelivered = api.post(f"/v2/requests/{gone}/webhooks/redeliver", headers=alice.headers)
    assert redelivered.status_code == 202
    assert redelivered.get_json()["state"] == "pending"
    assert _count(sessions, DisabledWebhook) == 0
    busy = api.post(f"/v2/requests/{gone}/webhooks/redeliver", headers=alice.headers)
    assert busy.status_code == 409
    claim = _claim(sessions, gone)
    assert deliver(resources, http, claim.delivery_id, claim.token) == "delivered"
    assert len(receiver.at("/gone")) == 2
    http.close()


def test_webhook_routes_are_tenant_scoped(
    loopback_app: Flask, sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    api = loopback_app.test_client()
    bob = make_user(sessions, "bob", 10_000)
    hooked = _ended_job(sessions, alice, PUBLIC)
    silent = _ended_job(sessions, alice, None)  # type: ignore[arg-type]
    assert api.get(f"/v2/requests/{hooked}/webhooks", headers=bob.headers).status_code == 404
    assert (
        api.post(f"/v2/requests/{hooked}/webhooks/redeliver", headers=bob.headers).status_code
        == 404
    )
    listed = api.get(f"/v2/requests/{hooked}/webhooks", headers=alice.headers).get_json()
    assert listed["webhook"] == PUBLIC and listed["webhook_events_filter"] == ["completed"]
    assert [d["state"] for d in listed["deliveries"]] == ["pending"]
    nothing = api.post(f"/v2/requests/{silent}/webhooks/redeliver", headers=alice.headers)
    assert nothing.status_code == 404
    assert (
        api.get(f"/v2/requests/{silent}/webhooks", headers=alice.headers).get_json()["deliveries"]
        == []
    )


def test_delivery_checks_the_address_again_and_records_connection_errors(
    settings: Settings,
    loopback_settings: Settings,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    receiver: Receiver,
) -> None:
    http = httpx.Client(timeout=2, follow_redirects=False, trust_env=False)
    # Accepted while loopback was allowed, refused at delivery once it is not.
    rebound = _ended_job(sessions, alice, receiver.url("/rebound"))
    claim = _claim(sessions, rebound)
    assert deliver(resources_for(settings, sessions), http, claim.delivery_id, claim.token) == (
        "pending"
    )
    assert receiver.at("/rebound") == []
    # Nothing listening: a connection error, retried later.
    with running_receiver() as gone_away:
        port = gone_away.port
    down = _ended_job(sessions, alice, f"http://127.0.0.1:{port}/down")
    claim = _claim(sessions, down)
    resources = resources_for(loopback_settings, sessions)
    assert deliver(resources, http, claim.delivery_id, claim.token) == "pending"
    with read_only(sessions) as session:
        errors = session.execute(
            select(WebhookAttempt.error, WebhookAttempt.status_code).order_by(WebhookAttempt.id)
        ).all()
    assert [e.status_code for e in errors] == [None, None]
    assert errors[0].error.startswith("refused: its host resolves to 127.0.0.1")
    assert "ConnectError" in errors[1].error
    http.close()


def test_the_completed_body_is_the_request_s_result(
    loopback_settings: Settings,
    loopback_app: Flask,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    receiver: Receiver,
) -> None:
    job_id = _ended_job(sessions, alice, receiver.url("/body"))
    claim = _claim(sessions, job_id)
    http = httpx.Client(timeout=2, follow_redirects=False, trust_env=False)
    deliver(resources_for(loopback_settings, sessions), http, claim.delivery_id, claim.token)
    http.close()
    (got,) = receiver.at("/body")
    sent = json.loads(got.body)
    shown = loopback_app.test_client().get(f"/v2/requests/{job_id}", headers=alice.headers)
    expected = shown.get_json()
    for volatile in ("output_expires_at",):
        sent.pop(volatile), expected.pop(volatile)
    assert sent == expected
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 44).verify(got.body, got.headers)


def test_admins_see_a_tenant_s_signing_secrets(
    client: FlaskClient, sessions: sessionmaker[Session], alice: ApiUser
) -> None:
    root = make_user(sessions, "root", 0)
    with transaction(sessions) as session:
        session.execute(update(User).where(User.name == "root").values(is_admin=True))
    path = "/v1/admin/tenants/alice/webhook-secret"
    assert client.get(path, headers=alice.headers).status_code == 403
    shown = client.get(path, headers=root.headers)
    assert shown.status_code == 200 and shown.headers["Cache-Control"] == "no-store"
    with transaction(sessions) as session:
        assert shown.get_json()["secret"] == tenant_secret_by_name(session, "alice")
        rotated = rotate_secret(session, "alice")
    after = client.get(path, headers=root.headers).get_json()
    assert after["secret"] == rotated and after["signing"][0] == rotated
    assert after["signing"][1] == shown.get_json()["secret"]
    unknown = client.get("/v1/admin/tenants/nobody/webhook-secret", headers=root.headers)
    assert unknown.status_code == 404


def test_the_sweeper_reads_pending_deliveries_on_their_partial_index(engine: Engine) -> None:
    due = plan(engine, due_read(utcnow(), 100))
    assert "ix_webhook_deliveries_due" in due
    assert "TEMP B-TREE" not in due and "Sort" not in due  # the index's order
