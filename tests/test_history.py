"""Request history, daily usage and the caller's account, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import csv
import io
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import ClauseElement

from shared.accounts.history import HistoryKey, UsageKey, history_read, usage_read
from shared.accounts.ledger import grant_credits
from shared.accounts.pricing import format_credits
from shared.db import transaction
from shared.jobs.transitions import claim_job, fail_job, finish_job, record_image
from shared.migrate import alembic_config, migrate_database
from shared.models import Job, JobState, LedgerEntry, User, utcnow
from tests.conftest import ApiUser, make_user, release_job

RICH = 10_000_000  # millicredits: ten thousand credits


def submit(client: FlaskClient, user: ApiUser, prompt: str = "a fox", **params: Any) -> str:
    body = {"prompt": prompt, "width": 512, "height": 512, **params}
    response = client.post("/v2/kolors", json=body, headers=user.headers)
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["request_id"]
    return job_id


def claimed(sessions: sessionmaker[Session], job_id: str) -> int:
    """Release and claim a job as the dispatcher and a worker would; its attempt."""
    with transaction(sessions) as session:
        spec = claim_job(session, release_job(session, job_id), "w1", timedelta(minutes=5))
        assert spec is not None
        return spec.attempt


def deliver(app: Flask, sessions: sessionmaker[Session], job_id: str, images: int) -> None:
    """Store and record `images` images of a claimed job, then finish it."""
    attempt = claimed(sessions, job_id)
    storage = app.extensions["kolors_farm"].storage
    with transaction(sessions) as session:
        job = session.get_one(Job, job_id)
        for index in range(images):
            key = f"{job.tenant_id}/{job_id}/{index}.webp"
            storage.put(key, f"image {index}".encode(), "image/webp")
            record_image(
                session,
                job_id,
                attempt,
                index,
                seed=job.seed + index,
                storage_key=key,
                content_type="image/webp",
                size_bytes=7,
            )
        finish_job(session, job_id, attempt)


def pages(client: FlaskClient, user: ApiUser, query: str, limit: int) -> list[dict[str, Any]]:
    """Every request of a listing, page by page; checks that each page is full but the last."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        url = f"/v2/requests?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        response = client.get(url, headers=user.headers)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        found += body["requests"]
        cursor = body["next_cursor"]
        if cursor is None:
            return found
        assert len(body["requests"]) == limit


def ids(requests: list[dict[str, Any]]) -> list[str]:
    return [request["request_id"] for request in requests]


def test_pages_are_complete_and_disjoint_when_requests_share_a_time(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    alice = make_user(sessions, "alice", RICH)
    made = [submit(client, alice, f"fox {n}") for n in range(9)]
    same = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    with transaction(sessions) as session:  # seven requests in the same microsecond
        session.execute(update(Job).where(Job.id.in_(made[:7])).values(created_at=same))
        session.execute(
            update(Job).where(Job.id.in_(made[7:])).values(created_at=same - timedelta(hours=1))
        )
    expected = sorted(made[:7], reverse=True) + sorted(made[7:], reverse=True)
    for limit in (1, 2, 3, 9, 100):
        assert ids(pages(client, alice, "", limit)) == expected


def test_status_filter_uses_public_states_and_failed_includes_cancelled(
    app: Flask, client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    alice = make_user(sessions, "alice", RICH)
    queued = submit(client, alice, "queued")
    running = submit(client, alice, "running")
    claimed(sessions, running)
    done = submit(client, alice, "done", number_of_images=2, seed=7)
    deliver(app, sessions, done, 2)
    cancelled_first = submit(client, alice, "cancelled first")
    failed = submit(client, alice, "failed")
    cancelled_last = submit(client, alice, "cancelled last")
    for job_id in (cancelled_first, cancelled_last):
        assert client.delete(f"/v2/requests/{job_id}", headers=alice.headers).status_code == 200
    with transaction(sessions) as session:
        assert fail_job(session, failed, "out of memory")

    everything = pages(client, alice, "", 2)
    newest_first = [cancelled_last, failed, cancelled_first, done, running, queued]
    assert ids(everything) == newest_first
    for limit in (1, 2, 5):
        assert ids(pages(client, alice, "&status=FAILED", limit)) == newest_first[:3]
    assert ids(pages(client, alice, "&status=QUEUED", 1)) == [queued]
    assert ids(pages(client, alice, "&status=PROCESSING", 1)) == [running]
    completed = pages(client, alice, "&status=COMPLETED", 1)
    assert ids(completed) == [done]

    by_id = {request["request_id"]: request for request in everything}
    assert by_id[cancelled_last]["status"] == "FAILED" and by_id[cancelled_last]["cancelled"]
    assert by_id[failed]["error"] == "out of memory" and not by_id[failed]["cancelled"]
    assert by_id[running]["status"] == "PROCESSING" and by_id[running]["started_at"]
    summary = completed[0]
    assert summary["user"] == "alice" and summary["prompt"] == "done"
    assert summary["parameters"]["seed"] == 7 and summary["parameters"]["width"] == 512
    assert (summary["number_of_images"], summary["images_done"]) == (2, 2)
    assert len(summary["output"]) == 2 and by_id[queued]["output"] == []
    image = client.get(summary["output"][1].removeprefix("http://localhost"))
    assert image.status_code == 200 and image.data == b"image 1"


def test_another_tenants_requests_never_appear(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    alice = make_user(sessions, "alice", RICH, tenant="studio")
    carol = make_user(sessions, "carol", RICH, tenant="studio")
    bob = make_user(sessions, "bob", RICH, tenant="elsewhere")
    mine = [submit(client, alice), submit(client, carol)]
    theirs = [submit(client, bob) for _ in range(3)]
    seen = pages(client, alice, "", 1)
    assert ids(seen) == mine[::-1]
    assert [request["user"] for request in seen] == ["carol", "alice"]
    assert ids(pages(client, bob, "&status=QUEUED", 2)) == theirs[::-1]
    # Bob's cursor, replayed by Alice, still reads only Alice's tenant.
    first = client.get("/v2/requests?limit=1", headers=bob.headers).get_json()["next_cursor"]
    replay = client.get(f"/v2/requests?cursor={first}", headers=alice.headers).get_json()
    assert set(ids(replay["requests"])) <= set(mine)


def ledger_usage(sessions: sessionmaker[Session], user_id: int) -> dict[str, str]:
    """Today's movements of a user summed from the ledger itself."""
    sums: dict[str, int] = defaultdict(int)
    with transaction(sessions) as session:
        for entry in session.scalars(select(LedgerEntry).where(LedgerEntry.user_id == user_id)):
            assert entry.created_at.date() == utcnow().date()
            if entry.kind in ("grant", "release"):
                sums[entry.kind] += entry.available_delta
            else:
                sums[entry.kind] += abs(entry.held_delta)
    names = {"grant": "granted", "hold": "held", "capture": "captured", "release": "released"}
    return {names[kind]: format_credits(sums[kind]) for kind in names}


def test_usage_equals_the_ledger_as_json_and_csv(
    app: Flask, client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    alice = make_user(sessions, "alice", RICH, tenant="studio")
    carol = make_user(sessions, "carol", 5_000, tenant="studio")
    bob = make_user(sessions, "bob", RICH, tenant="elsewhere")
    with transaction(sessions) as session:
        grant_credits(session, carol.principal.user_id, 2_500, note="top-up")
    partial = submit(client, alice, number_of_images=3)  # held 3 x 0.25, captured 2, released 1
    attempt = claimed(sessions, partial)
    storage = app.extensions["kolors_farm"].storage
    with transaction(sessions) as session:
        for index in range(2):
            storage.put(f"k/{index}", b"x", "image/webp")
            record_image(
                session,
                partial,
                attempt,
                index,
                seed=index,
                storage_key=f"k/{index}",
                content_type="image/webp",
                size_bytes=1,
            )
        finish_job(session, partial, attempt, stopped_because="deadline")
    cancelled = submit(client, carol, steps=50)
    client.delete(f"/v2/requests/{cancelled}", headers=carol.headers)
    submit(client, bob)

    response = client.get("/v1/usage", headers=alice.headers)
    assert response.status_code == 200
    rows = response.get_json()["usage"]
    today = utcnow().date().isoformat()
    assert [(row["day"], row["user"]) for row in rows] == [(today, "alice"), (today, "carol")]
    for row, user in zip(rows, (alice, carol), strict=True):
        assert {k: v for k, v in row.items() if k not in ("day", "user")} == ledger_usage(
            sessions, user.principal.user_id
        )
    assert rows[0]["captured"] == "0.5" and rows[0]["released"] == "0.25"
    assert rows[1]["granted"] == "7.5" and rows[1]["held"] == rows[1]["released"] == "0.5"

    as_csv = client.get("/v1/usage", headers=alice.headers | {"Accept": "text/csv"})
    assert as_csv.mimetype == "text/csv"
    parsed = list(csv.DictReader(io.StringIO(as_csv.get_data(as_text=True))))
    assert parsed == rows and list(parsed[0]) == [
        "day",
        "user",
        "granted",
        "held",
        "captured",
        "released",
    ]

    paged, cursor = [], None
    while True:
        url = "/v1/usage?limit=1" + (f"&cursor={cursor}" if cursor else "")
        body = client.get(url, headers=alice.headers).get_json()
        paged += body["usage"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert paged == rows
    csv_page = client.get("/v1/usage?limit=1", headers=alice.headers | {"Accept": "text/csv"})
    assert csv_page.headers["X-Next-Cursor"]
    past = client.get("/v1/usage?from=2020-01-01&to=2020-12-31", headers=alice.headers)
    assert past.get_json() == {"usage": [], "next_cursor": None}


def test_me_names_the_caller(client: FlaskClient, sessions: sessionmaker[Session]) -> None:
    alice = make_user(sessions, "alice", 12_500, tenant="studio")
    response = client.get("/v1/me", headers=alice.headers)
    assert response.get_json() == {
        "user": "alice",
        "tenant": "studio",
        "is_admin": False,
        "credits": "12.5",
    }
    assert response.headers["x-remaining-credits"] == "12.5"
    assert client.get("/v1/me").status_code == 401


def _cursor(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/v2/requests?limit=0", "limit"),
        ("/v2/requests?limit=101", "limit"),
        ("/v2/requests?limit=ten", "limit"),
        ("/v2/requests?status=CANCELLED", "status"),
        ("/v2/requests?status=queued", "status"),
        ("/v2/requests?cursor=not-a-cursor!", "cursor"),
        ("/v2/requests?cursor=" + _cursor('{"t": "yesterday", "id": "x"}'), "cursor"),
        ("/v2/requests?cursor=" + _cursor('{"t": "2026-01-01T00:00:00", "id": "x"}'), "cursor"),
        ("/v2/requests?cursor=" + _cursor("[1, 2]"), "cursor"),
        (
            "/v2/requests?cursor=" + _cursor('{"t": "0001-01-01T00:00:00+05:00", "id": "x"}'),
            "cursor",
        ),
        (
            "/v1/usage?cursor=" + _cursor('{"d": "2026-01-01", "u": 100000000000000000000}'),
            "cursor",
        ),
        ("/v2/requests?page=2", "page"),
        ("/v1/usage?from=2026-02-30", "from"),
        ("/v1/usage?to=tomorrow", "to"),
        ("/v1/usage?from=2026-02-01&to=2026-01-31", "from"),
        ("/v1/usage?from=2025-01-01&to=2026-01-02", "to"),
        ("/v1/usage?limit=1001", "limit"),
        ("/v1/usage?cursor=" + _cursor('{"d": "2026-01-01", "u": "1"}'), "cursor"),
    ],
)
def test_bad_query_parameters_are_a_problem_naming_the_parameter(
    client: FlaskClient, alice: ApiUser, url: str, field: str
) -> None:
    response = client.get(url, headers=alice.headers)
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    assert [error["field"] for error in response.get_json()["errors"]] == [field]
    assert response.get_json()["errors"][0]["rule"]


def test_a_full_year_of_usage_is_allowed(client: FlaskClient, alice: ApiUser) -> None:
    windows = ("from=2024-01-01&to=2024-12-31", "from=2025-01-01&to=2026-01-01", "to=0001-01-05")
    for window in windows:
        response = client.get(f"/v1/usage?{window}", headers=alice.headers)
        assert response.status_code == 200, window  # 366 days, both ends included


def plan(engine: Engine, query: ClauseElement) -> str:
    """The database's plan of `query` (PostgreSQL told to avoid sequential scans, as it
    would on a large table: with a few rows a scan is cheapest and says nothing)."""
    compiled = query.compile(engine)
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SET enable_seqscan = off")
            rows = connection.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params)
        else:
            names: list[str] = getattr(compiled, "positiontup", None) or []
            values = tuple(compiled.params[name] for name in names)
            rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", values)
        return "\n".join(str(row[-1]) for row in rows)


def test_history_and_usage_reads_use_their_indexes(engine: Engine) -> None:
    after = HistoryKey(utcnow(), "f" * 32)
    everything = plan(engine, history_read(1, None, after, 21))
    assert "ix_jobs_tenant_history" in everything
    for state in (JobState.QUEUED, JobState.CANCELLED):
        assert "ix_jobs_tenant_state_history" in plan(engine, history_read(1, state, after, 21))
    usage = plan(
        engine,
        usage_read(1, date(2026, 1, 1), date(2026, 12, 31), 101, UsageKey(date(2026, 3, 1), 4)),
    )
    assert "ix_usage_days_tenant_day" in usage
    for text_plan in (everything, usage):
        assert "TEMP B-TREE" not in text_plan and "Sort" not in text_plan  # index order


def test_upgrade_to_0005_rolls_the_existing_ledger_up_by_user_and_utc_day(
    engine: Engine, database_url: str
) -> None:
    command.downgrade(alembic_config(database_url), "0004")
    postgres = engine.dialect.name == "postgresql"

    def at(day: int, hour: int, minute: int = 0) -> datetime:
        moment = datetime(2026, 11, day, hour, minute, tzinfo=UTC)
        return moment if postgres else moment.replace(tzinfo=None)

    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO tenants (id, name, weight, created_at) VALUES (1, 't', 1, :t)"),
            {"t": at(1, 0)},
        )
        for user in (1, 2):
            connection.execute(
                text(
                    "INSERT INTO users (id, tenant_id, name, weight, balance, created_at) "
                    "VALUES (:u, 1, :n, 1, 0, :t)"
                ),
                {"u": user, "n": f"u{user}", "t": at(1, 0)},
            )
        entries = [  # user, kind, available_delta, held_delta, when
            (1, "grant", 10_000, 0, at(1, 9)),
            (1, "hold", -3_000, 3_000, at(1, 23, 59)),
            (1, "capture", 0, -1_000, at(2, 0, 1)),  # the next UTC day
            (1, "capture", 0, -1_000, at(2, 0, 2)),
            (1, "release", 1_000, -1_000, at(2, 0, 3)),
            (2, "grant", 500, 0, at(2, 12)),
        ]
        for user, kind, available, held, when in entries:
            connection.execute(
                text(
                    "INSERT INTO ledger_entries (user_id, kind, available_delta, held_delta, "
                    "created_at) VALUES (:u, :k, :a, :h, :t)"
                ),
                {"u": user, "k": kind, "a": available, "h": held, "t": when},
            )
    migrate_database(database_url)
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT user_id, day, granted, held, captured, released, tenant_id "
                "FROM usage_days ORDER BY day, user_id"
            )
        ).all()
    days = [(row[0], str(row[1])[:10], *row[2:]) for row in rows]
    assert days == [
        (1, "2026-11-01", 10_000, 3_000, 0, 0, 1),
        (1, "2026-11-02", 0, 0, 2_000, 1_000, 1),
        (2, "2026-11-02", 500, 0, 0, 0, 1),
    ]
    with Session(engine) as session:  # the models read what the migration wrote
        assert session.scalar(select(User.is_admin).where(User.id == 1)) is False
