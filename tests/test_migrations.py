"""The migrated schema matches the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from shared.migrate import alembic_config, migrate_database
from shared.models import Base


def test_migrated_schema_matches_models(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_and_upgrade_again(engine: Engine, database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate_database(database_url)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())


def test_upgrade_builds_each_users_line_from_existing_jobs(
    engine: Engine, database_url: str
) -> None:
    """Jobs queued before 0004 get consecutive line numbers, and each user a line row."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text

    command.downgrade(alembic_config(database_url), "0003")
    t0 = datetime(2026, 11, 1, tzinfo=UTC).replace(tzinfo=None)
    params = '{"width": 512, "height": 512, "steps": 25}'
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO tenants (id, name, weight, created_at) VALUES (1, 't', 1, :t)"),
            {"t": t0},
        )
        for user in (1, 2):
            connection.execute(
                text(
                    "INSERT INTO users (id, tenant_id, name, weight, balance, created_at) "
                    "VALUES (:u, 1, :n, 1, 0, :t)"
                ),
                {"u": user, "n": f"u{user}", "t": t0},
            )
        jobs = [  # (id, user, state, released, minutes after t0)
            ("a3", 1, "QUEUED", False, 3),
            ("a1", 1, "QUEUED", False, 1),
            ("a2", 1, "QUEUED", True, 2),
            ("a0", 1, "RUNNING", False, 0),
            ("a9", 1, "COMPLETED", False, 9),
            ("b1", 2, "QUEUED", False, 5),
        ]
        for job_id, user, state, released, minute in jobs:
            created = t0 + timedelta(minutes=minute)
            connection.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, user_id, state, params, seed, "
                    "number_of_images, images_done, price_per_image, attempt, cancel_requested, "
                    "created_at, released_at) "
                    "VALUES (:id, 1, :u, :s, :p, 1, 2, 0, 250, 0, false, :c, :r)"
                ),
                {
                    "id": job_id,
                    "u": user,
                    "s": state,
                    "p": params,
                    "c": created,
                    "r": created if released else None,
                },
            )
    migrate_database(database_url)
    with engine.connect() as connection:
        lines = {
            row.user_id: row
            for row in connection.execute(text("SELECT * FROM user_queues ORDER BY user_id"))
        }
        seqs = {
            row.id: row.queue_seq
            for row in connection.execute(text("SELECT id, queue_seq FROM jobs"))
        }
        works = {row.id: row.work for row in connection.execute(text("SELECT id, work FROM jobs"))}
        running_released = connection.execute(
            text("SELECT released_at FROM jobs WHERE id = 'a0'")
        ).scalar_one()
    first = lines[1]
    assert (first.waiting, first.in_flight, first.head_seq) == (2, 2, 0)
    assert (first.head_job_id, first.tail_job_id) == ("a1", "a3")
    assert (seqs["a1"], seqs["a3"]) == (0, 1)
    assert first.waiting_work == 2 * (512 * 512 * 25 * 2)
    assert works["a2"] == 512 * 512 * 25 * 2 and works["a9"] == 0  # ended jobs need no size
    assert running_released is not None  # a RUNNING job was always released
    assert (lines[2].waiting, lines[2].in_flight, lines[2].head_job_id) == (1, 0, "b1")
