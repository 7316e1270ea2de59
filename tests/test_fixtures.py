"""The tests' own set-up: emptying a database names every table; Redis databases are not shared."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import redis
import sqlalchemy
from sqlalchemy import func, select

from control.launcher import start_scratch_redis
from shared.db import make_engine, make_session_factory, transaction
from shared.models import (
    DisabledWebhook,
    IdempotencyKey,
    JobImage,
    WebhookAttempt,
    WebhookDelivery,
    utcnow,
)
from shared.webhooks.secrets import tenant_secret
from tests.conftest import TABLES, empty_database, make_job, make_user
from tests.farms import RedisDatabases


def row_counts(url: str) -> dict[str, int]:
    """Rows of each table of the live database (its migration bookkeeping aside)."""
    engine = make_engine(url)
    try:
        names = set(sqlalchemy.inspect(engine).get_table_names()) - {"alembic_version"}
        with engine.connect() as connection:
            return {
                name: connection.scalar(select(func.count()).select_from(sqlalchemy.table(name)))
                or 0
                for name in sorted(names)
            }
    finally:
        engine.dispose()


def fill_every_table(url: str) -> None:
    """At least one row in each table: a user, a job and its image, webhooks, a key."""
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        user = make_user(sessions, "filler", 10_000)
        job = make_job(sessions, user, release=True)
        with transaction(sessions) as session:
            tenant_secret(session, user.principal.tenant_id)
            session.add(
                JobImage(
                    job_id=job.id,
                    index=0,
                    seed=1,
                    storage_key="k",
                    content_type="image/webp",
                    size_bytes=1,
                    attempt=1,
                )
            )
            delivery = WebhookDelivery(
                id="delivery-1",
                job_id=job.id,
                tenant_id=user.principal.tenant_id,
                event="completed",
                url="https://example.com/hook",
            )
            session.add(delivery)
            session.flush()
            session.add(WebhookAttempt(delivery_id=delivery.id, status_code=500))
            session.add(
                DisabledWebhook(
                    tenant_id=user.principal.tenant_id, url_hash="0" * 64, url="https://gone"
                )
            )
            session.add(
                IdempotencyKey(
                    user_id=user.principal.user_id,
                    key="once",
                    fingerprint="0" * 64,
                    job_id=job.id,
                    expires_at=utcnow() + timedelta(days=1),
                )
            )
    finally:
        engine.dispose()


def test_tables_are_every_table_of_the_migrated_schema(postgres_database: str) -> None:
    assert set(row_counts(postgres_database)) == set(TABLES)


def test_empty_database_leaves_every_table_empty(postgres_database: str) -> None:
    url = empty_database(postgres_database)
    fill_every_table(url)
    filled = row_counts(url)
    assert [name for name, rows in filled.items() if not rows] == [], (
        "fill_every_table must put a row in each table"
    )
    empty_database(url)
    assert row_counts(url) == dict.fromkeys(filled, 0)


def test_redis_databases_are_held_by_one_and_emptied_for_the_next(tmp_path: Path) -> None:
    server = start_scratch_redis(tmp_path / "redis")  # its own: every database is handed out
    try:
        databases = RedisDatabases(server.url)
        first, second = databases.acquire(), databases.acquire()
        assert len({first, second, server.url}) == 3  # database 0 is never handed out
        redis.Redis.from_url(first).set("mine", "1")
        redis.Redis.from_url(second).set("yours", "1")
        databases.release(first)
        # Released, it is handed out again last, emptied; the one still held keeps its keys.
        again = [databases.acquire() for _ in range(14)]
        assert again[-1] == first and first not in again[:-1]
        assert redis.Redis.from_url(first).dbsize() == 0
        assert redis.Redis.from_url(second).get("yours") == b"1"
        with pytest.raises(RuntimeError, match="Redis databases are held"):
            databases.acquire()
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)
