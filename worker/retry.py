"""Short write transactions of a worker, retried while the database is unreachable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from shared.db import transaction

if TYPE_CHECKING:
    from worker.context import WorkerContext

log = logging.getLogger(__name__)
T = TypeVar("T")


def with_db_retry(context: WorkerContext, write: Callable[[Session], T]) -> T:
    """Run a short write transaction, retrying while the database is unreachable.

    Retrying is safe: every write is fenced by the attempt, so a write that lands
    after recovery requeued the job is refused, not applied twice.
    """
    give_up_at = time.monotonic() + context.settings.db_retry_s
    while True:
        try:
            with transaction(context.sessions) as session:
                return write(session)
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() >= give_up_at:
                raise
            log.warning("database unavailable (%s); retrying", type(exc).__name__)
            time.sleep(1.0)
