"""Engine and session factories for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# libpq's network settings for a database on another host, unless the URL sets them: a
# server that went away (a partition drops packets, it refuses nothing) fails a
# connection attempt in 10 s and a statement whose packets go unanswered in 30 s,
# instead of hanging a request or a worker thread for the kernel's 15 minutes.
POSTGRES_NETWORK: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
# Execution option marking a read-only transaction (see `read_only`).
READ_ONLY_OPTION = "kolors_farm_read_only"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and write-locking transactions."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        network = {k: v for k, v in POSTGRES_NETWORK.items() if k not in parsed.query}
        if parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"] = network | kwargs.get("connect_args", {})
        return create_engine(url, pool_pre_ping=True, **kwargs)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event (below) own transaction start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # Every read has its index; an automatic one is built per query, O(rows) each time.
        cursor.execute("PRAGMA automatic_index=OFF")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            # WAL readers see a snapshot and never wait for, or hold up, a writer.
            connection.exec_driver_sql("BEGIN DEFERRED")
            return
        # A deferred transaction that reads and then writes cannot wait for the
        # write lock (SQLite answers SQLITE_BUSY at once); IMMEDIATE takes it up
        # front, so the busy timeout applies and concurrent writers queue.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One short unit of work: commit on success, roll back on error, always close."""
    with factory.begin() as session:
        yield session


@contextmanager
def read_only(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction that only reads: on SQLite it never takes the write lock."""
    with factory() as session:
        session.connection(execution_options={READ_ONLY_OPTION: True})
        yield session
        # End with COMMIT, not ROLLBACK: psycopg forgets its prepared statements on every
        # rollback, and PostgreSQL then plans each read afresh (several ms for the queue
        # position). Nothing is written: the objects are detached first, so a change made
        # to one by mistake is dropped as a rollback would, and they stay readable.
        session.expunge_all()
        session.commit()
