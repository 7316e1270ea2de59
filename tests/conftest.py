"""Fixtures on real parts: a private Redis server, SQLite files, a PostgreSQL database.

Also the factories tests build on: Redis databases of their own (`redis_databases`),
farms of real processes (`module_farms`, `farms`: tests/farms.py), the tiny checkpoint
and its loaded renderer, users (`make_user`) and jobs (`make_job`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from control.launcher import RedisServer, start_scratch_redis
from shared.accounts.users import Principal, create_user
from shared.db import make_engine, make_session_factory, transaction
from shared.jobs.params import KolorsParams
from shared.jobs.transitions import submit_job
from shared.migrate import migrate_database
from shared.models import Base, Job, Tenant, User
from shared.redis_client import make_redis
from shared.resources import Resources
from shared.scheduling.fairshare import QueuedJob, ShareState
from shared.settings import Settings
from shared.storage import ResultStorage, make_storage
from tests.farms import FarmFactory, RedisDatabases
from tests.host_farm import HostFarm, start_host_farm
from tests.hosts import netns_available

if TYPE_CHECKING:
    from worker.pipeline import KolorsRenderer

POSTGRES_ADMIN_URL = os.environ.get(
    "KOLORS_FARM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_scratch_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_databases(redis_server: RedisServer) -> RedisDatabases:
    """The scratch server's databases: every fixture and test that needs one takes one here."""
    return RedisDatabases(redis_server.url)


@pytest.fixture
def redis_url(redis_databases: RedisDatabases) -> Iterator[str]:
    """A Redis database of the test's own, empty."""
    with redis_databases.database() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"kolors_farm_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sqlalchemy.exc.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}")
    url = (
        sqlalchemy.make_url(POSTGRES_ADMIN_URL)
        .set(database=name)
        .render_as_string(hide_password=False)
    )
    migrate_database(url)
    yield url
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


# Every table the models declare: a new table is emptied too, never forgotten.
TABLES = tuple(table.name for table in Base.metadata.sorted_tables)


def empty_database(url: str) -> str:
    """Delete every row of a migrated PostgreSQL database (faster than migrating a new one)."""
    engine = make_engine(url)
    names = ", ".join(f'"{name}"' for name in TABLES)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: a new SQLite file, or the session's PostgreSQL emptied."""
    if request.param == "sqlite":
        sqlite_url = f"sqlite:///{tmp_path / 'farm.db'}"
        migrate_database(sqlite_url)
        return sqlite_url
    return empty_database(request.getfixturevalue("postgres_database"))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        redis_url=redis_url,
        price_per_image=Decimal("1"),
        sync_timeout_s=5,
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    yield app
    app.extensions["kolors_farm"].engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@dataclass
class ApiUser:
    """A user with its clear API key."""

    principal: Principal
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key}


def make_user(
    sessions: sessionmaker[Session],
    name: str,
    millicredits: int,
    tenant: str | None = None,
    *,
    admin: bool = False,
) -> ApiUser:
    """Create a user the way the CLI does (in a tenant named after it unless told otherwise)."""
    with transaction(sessions) as session:
        user, key = create_user(session, name, tenant or name, millicredits, admin=admin)
        principal = Principal(user_id=user.id, tenant_id=user.tenant_id, user_name=user.name)
    return ApiUser(principal=principal, key=key)


def make_job(
    sessions: sessionmaker[Session],
    user: ApiUser | Principal,
    params: KolorsParams | None = None,
    *,
    price: Decimal = Decimal(1),
    release: bool = False,
    max_live_jobs: int | None = None,
    deadline: timedelta | None = None,
    retention: timedelta | None = None,
    **fields: Any,
) -> Job:
    """Submit a job the way the API does (`submit_job`: queued, its price held); the new Job.

    Its parameters are `params`, or `fields` (a prompt of "x" unless given); `price` is the
    reference price (1024x1024, 25 steps). With `release`, it is also released in the same
    transaction, as the dispatcher would, so that a worker may claim it.
    """
    if params is None:
        params = KolorsParams.model_validate({"prompt": "x", **fields})
    elif fields:
        raise TypeError("give the job's params or its fields, not both")
    principal = user.principal if isinstance(user, ApiUser) else user
    with transaction(sessions) as session:
        job = submit_job(
            session,
            principal,
            params,
            price,
            max_live_jobs=max_live_jobs,
            deadline=deadline,
            retention=retention,
        )
        if release:
            release_job(session, job.id)
    return job


@pytest.fixture
def alice(sessions: sessionmaker[Session]) -> ApiUser:
    return make_user(sessions, "alice", 10_000)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight checkpoint, built once per session (offline, about a second)."""
    from worker.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def renderer(tiny_model_dir: Path) -> KolorsRenderer:
    """The real KolorsPipeline on the tiny checkpoint, on the CPU, loaded once a session."""
    from worker.pipeline import KolorsRenderer

    return KolorsRenderer.load(Settings(model=str(tiny_model_dir)), "cpu")


@pytest.fixture(scope="module")
def module_farms(
    redis_databases: RedisDatabases,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FarmFactory]:
    """Starts farms of real processes that run until the module's last test is done."""
    factory = FarmFactory(redis_databases, tiny_model_dir, tmp_path_factory)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def farms(
    redis_databases: RedisDatabases,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FarmFactory]:
    """Starts farms of real processes that run until the test is done."""
    factory = FarmFactory(redis_databases, tiny_model_dir, tmp_path_factory)
    try:
        yield factory
    finally:
        factory.close()


# The multi-host farm's worker hosts keep wrong clocks all along: every multi-host test
# also shows that leases, deadlines and retention follow the database's clock.
WORKER_CLOCK_OFFSETS = {"worker-a": 5 * 60, "worker-b": -5 * 60}


@pytest.fixture(scope="session")
def host_farm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostFarm]:
    """The farm over four hosts (tests/host_farm.py), built once and shared by every test."""
    unavailable = netns_available()
    if unavailable is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the multi-host tests must run in CI: {unavailable}")
        pytest.skip(unavailable)
    farm = start_host_farm(tmp_path_factory.mktemp("hosts"), tiny_model_dir, WORKER_CLOCK_OFFSETS)
    try:
        yield farm
    finally:
        farm.close()


def have_redis_binary() -> bool:
    return shutil.which("redis-server") is not None


def resources_for(
    settings: Settings, sessions: sessionmaker[Session], storage: ResultStorage | None = None
) -> Resources:
    """The process resources of `settings`, on a test's own session factory (and storage)."""
    engine = sessions.kw["bind"]
    assert isinstance(engine, Engine)
    return Resources(
        settings=settings,
        engine=engine,
        sessions=sessions,
        redis=make_redis(settings.require_redis_url()),
        storage=storage or make_storage(settings.resolved_storage_url),
    )


def release_job(session: Session, job_id: str) -> str:
    """Release one waiting job, as the dispatcher would, so that a worker may claim it."""
    from shared.jobs.transitions import release_jobs

    job = session.get_one(Job, job_id)
    release_jobs(session, [QueuedJob(job.id, job.tenant_id, job.user_id, job.created_at)])
    return job_id


def exact_queue(session: Session) -> tuple[list[QueuedJob], ShareState]:
    """The whole queue read row by row (what the scheduler must never do), for comparison."""
    waiting = [
        QueuedJob(job.id, job.tenant_id, job.user_id, job.created_at)
        for job in session.execute(
            select(Job).where(Job.state == "QUEUED", Job.released_at.is_(None))
        ).scalars()
    ]
    flying = session.execute(
        select(Job.tenant_id, Job.user_id).where(
            (Job.state == "RUNNING") | ((Job.state == "QUEUED") & Job.released_at.is_not(None))
        )
    ).all()
    tenant_weights = session.execute(select(Tenant.id, Tenant.weight))
    user_weights = session.execute(select(User.id, User.weight))
    state = ShareState(
        tenant_active=Counter(row.tenant_id for row in flying),
        user_active=Counter(row.user_id for row in flying),
        tenant_weight={row.id: row.weight for row in tenant_weights},
        user_weight={row.id: row.weight for row in user_weights},
    )
    return waiting, state
