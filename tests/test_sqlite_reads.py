"""Read-only transactions: on SQLite they never wait for the write lock (polls go on beside a
writer); on every database they write nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from shared.db import make_engine, make_session_factory, read_only, transaction
from shared.migrate import migrate_database
from shared.models import Job, JobState
from shared.settings import Settings
from tests.conftest import make_job, make_user


@pytest.mark.parametrize(
    "path",
    ["/v2/requests/{job}/status", "/v2/requests/{job}", "/v1/get-user-credits"],
)
def test_reads_complete_while_another_process_holds_the_write_lock(
    tmp_path: Path, redis_url: str, path: str
) -> None:
    url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate_database(url)
    sessions = make_session_factory(make_engine(url))
    user = make_user(sessions, "reader", 10_000)
    job = make_job(sessions, user).id
    app = create_app(Settings(data_dir=tmp_path, database_url=url, redis_url=redis_url))
    client: FlaskClient = app.test_client()

    holding, done_reading = threading.Event(), threading.Event()
    outcome: list[str] = []

    def writer() -> None:
        # A writing transaction (BEGIN IMMEDIATE) holds SQLite's write lock until the
        # reader is done, or 20 s at most so a broken reader cannot hang the test.
        with transaction(sessions) as session:
            session.execute(text("SELECT 1"))
            holding.set()
            outcome.append("read first" if done_reading.wait(20) else "lock released first")

    thread = threading.Thread(target=writer)
    thread.start()
    assert holding.wait(20)
    response = client.get(path.format(job=job), headers=user.headers)
    done_reading.set()
    thread.join()
    assert response.status_code == 200, response.get_json()
    assert outcome == ["read first"]
    app.extensions["kolors_farm"].close()


def test_a_read_only_transaction_writes_nothing_and_keeps_its_objects_readable(
    sessions: sessionmaker[Session],
) -> None:
    user = make_user(sessions, "reader", 10_000)
    job_id = make_job(sessions, user).id
    with read_only(sessions) as session:
        job = session.get_one(Job, job_id)
        job.state = JobState.FAILED  # a change made by mistake inside a read
    assert job.state == JobState.FAILED and job.id == job_id  # still readable after the end
    with read_only(sessions) as session:
        assert session.get_one(Job, job_id).state == JobState.QUEUED
