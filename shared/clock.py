"""The database's clock: the time that decides leases, deadlines and retention (DESIGN 11)."""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

# How long a measured offset is trusted. Clocks drift by milliseconds a day, but NTP may
# step a host's clock at any moment: a step is followed within this long.
REMEASURE_AFTER_S: Final = 30.0


def _host_now() -> datetime:
    # The one read of this host's wall clock here (a test moves it to play a wrong host).
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Offset:
    """How far the database's clock is ahead of this host's, and when that was measured."""

    offset: timedelta
    measured_at: float  # time.monotonic(), immune to the wall clock's steps


_offsets: weakref.WeakKeyDictionary[Engine, _Offset] = weakref.WeakKeyDictionary()
_lock = threading.Lock()  # workers read the clock from several threads


def database_now(session: Session) -> datetime:
    """The database server's current time (aware, UTC), read through this host's clock."""
    bind = session.get_bind()
    engine = bind.engine if isinstance(bind, Connection) else bind
    if engine.dialect.name == "sqlite":
        # SQLite is embedded: the database's clock is this host's. Nothing to measure.
        return _host_now()
    with _lock:
        known = _offsets.get(engine)
    if known is None or time.monotonic() - known.measured_at >= REMEASURE_AFTER_S:
        known = _measure(session)
        with _lock:
            _offsets[engine] = known
    # An offset rather than a query each time: no round trip added to every transaction.
    return _host_now() + known.offset


def _measure(session: Session) -> _Offset:
    # Through the session's own connection (not the session, which would flush first).
    # A failure propagates: the session is unusable anyway, and nothing is cached.
    before = _host_now()
    server = session.connection().execute(text("SELECT clock_timestamp()")).scalar_one()
    after = _host_now()
    # The server read its clock somewhere within the round trip: assume its middle.
    midpoint = before + (after - before) / 2
    return _Offset(server.astimezone(UTC) - midpoint, time.monotonic())
