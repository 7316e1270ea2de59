"""The operators' routes on both databases: who may call them, pages, workers, grants."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.db import read_only
from shared.models import LedgerEntry, User
from shared.scheduling.fleet import DISPATCH_LOCK_KEY, record_heartbeat, record_render_speed
from shared.settings import Settings
from tests.conftest import ApiUser, make_user

ROUTES = (
    ("GET", "/v1/admin/workers"),
    ("GET", "/v1/admin/tenants"),
    ("GET", "/v1/admin/users"),
    ("POST", "/v1/admin/users/alice/credits"),
)


@pytest.fixture
def root(sessions: sessionmaker[Session]) -> dict[str, str]:
    """An operator's headers."""
    return make_user(sessions, "root", 0, tenant="ops", admin=True).headers


def ledger_entries(sessions: sessionmaker[Session]) -> int:
    with read_only(sessions) as session:
        return int(session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one())


def balance_of(sessions: sessionmaker[Session], name: str) -> int:
    with read_only(sessions) as session:
        return int(session.execute(select(User.balance).where(User.name == name)).scalar_one())


def call(client: FlaskClient, method: str, path: str, **kwargs: Any) -> Any:
    if method == "POST":
        kwargs.setdefault("json", {"credits": "1"})
    return client.open(path, method=method, **kwargs)


def test_admin_routes_need_an_admin_key(
    client: FlaskClient, sessions: sessionmaker[Session], alice: ApiUser, root: dict[str, str]
) -> None:
    before = ledger_entries(sessions)
    for method, path in ROUTES:
        anonymous = call(client, method, path)
        assert anonymous.status_code == 401, (path, anonymous.get_json())
        refused = call(client, method, path, headers=alice.headers)
        assert refused.status_code == 403, (path, refused.get_json())
        assert refused.content_type == "application/problem+json"
        assert refused.get_json()["status"] == 403
        assert "admin" in refused.get_json()["error"]
        allowed = call(client, method, path, headers=root)
        assert allowed.status_code == 200, (path, allowed.get_json())
    # Only the operator's grant wrote to the ledger.
    assert ledger_entries(sessions) == before + 1


def test_workers_show_each_heartbeat_and_the_dispatcher(
    client: FlaskClient, settings: Settings, root: dict[str, str]
) -> None:
    client_redis = redis.Redis.from_url(settings.require_redis_url())
    record_heartbeat(
        client_redis,
        "gpu0@host",
        {
            "device": "cuda:0",
            "device_name": "NVIDIA H100",
            "host": "host",
            "model": "Kwai-Kolors/Kolors-diffusers",
            "pid": 42,
            "memory_total_bytes": 80 * 1024**3,
            "memory_free_bytes": 30 * 1024**3,
            "warm": True,
            "job": "job-1",
            "busy_fraction": 0.75,
            "busy_fraction_since_start": 0.5,
        },
        ttl_s=30,
    )
    record_heartbeat(client_redis, "cpu0@host", {"device": "cpu", "warm": False}, ttl_s=30)
    record_render_speed(client_redis, "gpu0@host", 0.25)
    client_redis.set(DISPATCH_LOCK_KEY, "dispatcher@host")

    body = client.get("/v1/admin/workers", headers=root).get_json()
    assert body["dispatcher"] == "dispatcher@host"
    assert [worker["name"] for worker in body["workers"]] == ["cpu0@host", "gpu0@host"]
    cpu, gpu = body["workers"]
    assert gpu["device"] == "cuda:0" and gpu["device_name"] == "NVIDIA H100"
    assert gpu["memory_total_mb"] == 80 * 1024 and gpu["memory_used_mb"] == 50 * 1024
    assert gpu["warm"] is True and gpu["current_job"] == "job-1"
    assert gpu["busy_fraction"] == 0.75 and gpu["seconds_per_work_unit"] == 0.25
    assert gpu["pid"] == 42  # whatever else the heartbeat says comes along
    assert cpu["warm"] is False and cpu["current_job"] is None
    assert cpu["busy_fraction"] is None and cpu["memory_total_mb"] is None


def walk(client: FlaskClient, path: str, key: str, headers: dict[str, str]) -> list[Any]:
    """Every row of a paginated list, two at a time."""
    rows: list[Any] = []
    cursor: str | None = None
    for _ in range(20):
        query = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        response = client.get(path, query_string=query, headers=headers)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        assert len(body[key]) <= 2
        rows += body[key]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows
    raise AssertionError("the pages never ended")


def test_users_page_by_name_with_balances(
    client: FlaskClient, sessions: sessionmaker[Session], root: dict[str, str]
) -> None:
    for index, name in enumerate(["dora", "bob", "carol", "erin"]):
        make_user(sessions, name, 1500 * index, tenant="team" if index % 2 else None)
    users = walk(client, "/v1/admin/users", "users", root)
    assert [user["name"] for user in users] == ["bob", "carol", "dora", "erin", "root"]
    by_name = {user["name"]: user for user in users}
    assert by_name["bob"] == {
        "name": "bob",
        "tenant": "team",
        "credits": "1.5",
        "is_admin": False,
        "weight": 1,
    }
    assert by_name["dora"]["credits"] == "0" and by_name["dora"]["tenant"] == "dora"
    assert by_name["erin"]["credits"] == "4.5"
    assert by_name["root"]["is_admin"] is True and by_name["root"]["tenant"] == "ops"


def test_tenants_page_shows_each_queue(
    client: FlaskClient, sessions: sessionmaker[Session], alice: ApiUser, root: dict[str, str]
) -> None:
    make_user(sessions, "bob", 0, tenant="bobs")
    submitted = client.post(
        "/v2/kolors", json={"prompt": "a fox", "width": 512, "height": 512}, headers=alice.headers
    )
    assert submitted.status_code == 202, submitted.get_json()
    tenants = walk(client, "/v1/admin/tenants", "tenants", root)
    assert [tenant["name"] for tenant in tenants] == ["alice", "bobs", "ops"]
    alices, bobs, _ = tenants
    assert alices["queued"] == 1 and alices["running"] == 0 and alices["weight"] == 1
    assert alices["oldest_queued_at"] is not None
    assert bobs["queued"] == 0 and bobs["oldest_queued_at"] is None


def test_grant_adds_credits_and_a_ledger_entry_naming_the_admin(
    client: FlaskClient, sessions: sessionmaker[Session], alice: ApiUser, root: dict[str, str]
) -> None:
    before = balance_of(sessions, "alice")
    response = client.post(
        "/v1/admin/users/alice/credits",
        json={"credits": "12.345", "note": "quarterly top-up"},
        headers=root,
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {
        "user": "alice",
        "credits": str(Decimal(before + 12_345) / 1000),
    }
    assert balance_of(sessions, "alice") == before + 12_345
    with read_only(sessions) as session:
        entry = session.execute(
            select(LedgerEntry).order_by(LedgerEntry.id.desc()).limit(1)
        ).scalar_one()
        assert entry.available_delta == 12_345 and entry.user_id == alice.principal.user_id
        assert entry.note == "granted by root: quarterly top-up"
    # The user sees it too.
    credits = client.get("/v1/get-user-credits", headers=alice.headers).get_json()["credits"]
    assert Decimal(credits) == Decimal(before + 12_345) / 1000
    # A whole number of credits as a JSON number is a decimal too.
    assert (
        client.post("/v1/admin/users/alice/credits", json={"credits": 2}, headers=root).status_code
        == 200
    )
    assert balance_of(sessions, "alice") == before + 14_345


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"credits": "-1"}, "credits", "positive"),
        ({"credits": "0"}, "credits", "positive"),
        ({"credits": "1.0005"}, "credits", "decimal_places"),
        ({"credits": "ten"}, "credits", "decimal"),
        ({"credits": "NaN"}, "credits", "decimal"),
        ({"credits": "Infinity"}, "credits", "decimal"),
        ({"credits": "1e12"}, "credits", "maximum"),
        ({"credits": True}, "credits", "decimal"),
        ({"credits": None}, "credits", "decimal"),
        ({}, "credits", "missing"),
        ({"credits": "1", "amount": "1"}, "amount", "extra_forbidden"),
        ({"credits": "1", "note": "x" * 101}, "note", "string_too_long"),
        ([1], "body", "json_object"),
    ],
)
def test_bad_grants_name_the_field_and_write_nothing(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    alice: ApiUser,
    root: dict[str, str],
    body: Any,
    field: str,
    rule: str,
) -> None:
    before = (ledger_entries(sessions), balance_of(sessions, "alice"))
    response = client.post("/v1/admin/users/alice/credits", json=body, headers=root)
    assert response.status_code == 400, response.get_json()
    problem = response.get_json()
    assert response.content_type == "application/problem+json"
    assert {"field": field, "rule": rule} in [
        {"field": error["field"], "rule": error["rule"]} for error in problem["errors"]
    ], problem
    assert (ledger_entries(sessions), balance_of(sessions, "alice")) == before


def test_grant_to_an_unknown_user_is_404_and_writes_nothing(
    client: FlaskClient, sessions: sessionmaker[Session], root: dict[str, str]
) -> None:
    before = ledger_entries(sessions)
    response = client.post("/v1/admin/users/nobody/credits", json={"credits": "1"}, headers=root)
    assert response.status_code == 404
    assert "nobody" in response.get_json()["error"]
    assert ledger_entries(sessions) == before


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"cursor": "%%%"}, "cursor"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"page": "2"}, "page"),
    ],
)
def test_bad_page_queries_name_the_parameter(
    client: FlaskClient, root: dict[str, str], query: dict[str, str], field: str
) -> None:
    for path in ("/v1/admin/users", "/v1/admin/tenants"):
        response = client.get(path, query_string=query, headers=root)
        assert response.status_code == 400, (path, response.get_json())
        assert field in [error["field"] for error in response.get_json()["errors"]]
