"""The lease keeper: a thread that renews a claimed attempt's lease until the attempt is over."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy.exc import InterfaceError, OperationalError

from shared.db import transaction
from shared.jobs.transitions import RenderSpec, renew_lease

if TYPE_CHECKING:
    from worker.context import WorkerContext

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the claim's lease every third of its length until the job is settled."""

    def __init__(self, context: WorkerContext, spec: RenderSpec) -> None:
        self._context = context
        self._spec = spec
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (the job is settled, or left to recovery)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        lease_s = self._context.settings.lease_s
        while not self._stop.wait(lease_s / 3):
            try:
                with transaction(self._context.sessions) as session:
                    held = renew_lease(
                        session, self._spec.job_id, self._spec.attempt, timedelta(seconds=lease_s)
                    )
            except (OperationalError, InterfaceError) as exc:
                # The database is away; keep rendering and try again. If it stays away
                # past the lease, recovery requeues the job and our writes are refused.
                log.warning("job %s: lease not renewed (%s)", self._spec.job_id, type(exc).__name__)
                continue
            if not held and not self._stop.is_set():
                log.warning(
                    "job %s: attempt %d no longer holds the job; stopping",
                    self._spec.job_id,
                    self._spec.attempt,
                )
                self.lost.set()
                return
