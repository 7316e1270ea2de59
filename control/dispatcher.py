"""The dispatcher: releases queued jobs to the workers in fair-share order, and recovers.

One dispatcher is active at a time (a Redis lock with a short expiry; any
number may run, on any hosts, and a standby takes over within seconds). Every
change it makes is a conditional UPDATE, so even two active at once could not
release, requeue or settle a job twice. It is woken by each submission and
also ticks every `dispatch_interval_s`, which bounds how long a fault goes
unrepaired.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType

import redis
from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import LockError
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.celery_app import RENDER_QUEUE, make_celery, publish_render
from shared.clock import database_now
from shared.db import read_only, transaction
from shared.jobs.idempotency import IDEMPOTENCY_CLEANUP_BATCH, delete_expired_keys
from shared.jobs.queries import expired_results, stale_releases
from shared.jobs.transitions import (
    enforce_deadlines,
    mark_results_deleted,
    reclaim_claims_of,
    recover_expired_leases,
    release_jobs,
    touch_release,
    unrelease_job,
)
from shared.metrics.counters import Dispatched, record
from shared.models import JobState
from shared.resources import Resources, open_resources
from shared.scheduling.fleet import (
    DISPATCH_LOCK_KEY,
    lapsed_workers,
    live_workers,
    settling_jobs,
    wait_for_wake,
)
from shared.scheduling.order import current_load, next_in_fair_order
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class PassReport:
    """What one dispatch pass did, for logs and tests."""

    released: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # ended FAILED or CANCELLED
    expired: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


class Dispatcher:
    """Release and recovery passes against one database, Redis and broker."""

    def __init__(self, resources: Resources, celery: Celery) -> None:
        self.settings = resources.settings
        self.sessions = resources.sessions
        self.redis = resources.redis
        self.celery = celery
        self.storage = resources.storage
        self._next_cleanup = 0.0

    def run_pass(self, recover: bool = True) -> PassReport:
        """Recover what faults left behind (if `recover`), then release jobs into free slots."""
        report = PassReport()
        if recover:
            self._recover(report)
        self._release(report)
        self._count(report)
        if time.monotonic() >= self._next_cleanup:
            self._next_cleanup = time.monotonic() + self.settings.cleanup_interval_s
            try:
                report.deleted = self.delete_expired_results()
            except Exception as exc:
                # Storage trouble must not stop dispatching; the next cleanup retries.
                log.warning("result cleanup failed (%s); will retry", type(exc).__name__)
            try:
                with transaction(self.sessions) as session:
                    delete_expired_keys(session, database_now(session), IDEMPOTENCY_CLEANUP_BATCH)
            except (OperationalError, InterfaceError) as exc:
                log.warning("idempotency key cleanup failed (%s); will retry", type(exc).__name__)
        return report

    def delete_expired_results(self, batch: int = 200) -> list[str]:
        """Delete the stored images of jobs past retention, then mark them deleted."""
        with read_only(self.sessions) as session:
            expired = expired_results(session, batch)
        for job_id, keys in expired.items():
            for key in keys:
                self.storage.delete(key)
            # Marked only once every object is gone; a crash in between retries the deletes.
            with transaction(self.sessions) as session:
                mark_results_deleted(session, job_id)
        if expired:
            log.info("deleted the expired results of %d job(s)", len(expired))
        return list(expired)

    def _recover(self, report: PassReport) -> None:
        with transaction(self.sessions) as session:
            deadlines = enforce_deadlines(session)
            leases = recover_expired_leases(session, self.settings.max_attempts)
        # A worker whose heartbeat lapsed (crashed, or cut off) gives its jobs back now,
        # not when their leases run out; the attempt fence stops it if it was only late.
        lapsed = lapsed_workers(self.redis)
        if lapsed:
            with transaction(self.sessions) as session:
                leases += reclaim_claims_of(session, lapsed, self.settings.max_attempts)
        # Their cancel flags, requeue events and end announcements went out with the commit.
        report.expired = deadlines.cancelled
        for outcome in leases:
            if outcome.state == JobState.QUEUED:
                report.requeued.append(outcome.job_id)
            else:
                report.failed.append(outcome.job_id)
            log.warning(
                "job %s: lease of attempt %d expired; now %s",
                outcome.job_id,
                outcome.attempt,
                outcome.state.value,
            )
        self._republish_lost(report)

    def _count(self, report: PassReport) -> None:
        """Count what this pass did in the farm's metrics (jobs it ended count themselves)."""
        if report.released or report.requeued or report.republished:
            dispatched = Dispatched(
                len(report.released), len(report.requeued), len(report.republished)
            )
            record(self.redis, dispatched)

    def _republish_lost(self, report: PassReport) -> None:
        """Publish again the released jobs whose messages the broker no longer holds."""
        with read_only(self.sessions) as session:
            load = current_load(session)
        missing = load.released - self._broker_depth()
        if missing <= 0:
            return
        with read_only(self.sessions) as session:
            cutoff = database_now(session) - timedelta(seconds=self.settings.redispatch_after_s)
            lost = stale_releases(session, cutoff, missing)
        for job_id in lost:
            publish_render(self.celery, job_id)
            with transaction(self.sessions) as session:
                touch_release(session, job_id)
            report.republished.append(job_id)
            log.warning("job %s: its message was lost; published again", job_id)

    def _broker_depth(self) -> int:
        """Messages waiting in the render queue (kombu keeps them in a Redis list)."""
        return int(self.redis.llen(RENDER_QUEUE))

    def _release(self, report: PassReport) -> None:
        workers = live_workers(self.redis)
        # A job that finished rendering but is still being stored and recorded is RUNNING,
        # yet its worker's device is free: it must not hold back that worker's next job.
        settling = settling_jobs(self.redis, workers)
        # Decide on a snapshot (the only writer of releases is this process), then
        # write: SQLite's write lock is held only for the release itself.
        with read_only(self.sessions) as session:
            load = current_load(session)
            busy = load.running - settling + load.released
            slots = len(workers) + self.settings.dispatch_margin - busy
            picked = next_in_fair_order(session, slots, self.settings.max_running_per_user)
        if not picked:
            return
        with transaction(self.sessions) as session:
            released = release_jobs(session, picked)
        for job_id in released:
            try:
                publish_render(self.celery, job_id)
            except (BrokerError, OSError) as exc:
                log.error("job %s: could not publish (%s); back in line", job_id, exc)
                with transaction(self.sessions) as session:
                    unrelease_job(session, job_id)
                continue
            report.released.append(job_id)


def _leader_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_dispatcher(settings: Settings, stop: threading.Event | None = None) -> int:
    """Serve as a dispatcher (active or standby) until SIGTERM/SIGINT or `stop`."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    resources = open_resources(settings)
    client = resources.redis
    dispatcher = Dispatcher(resources, make_celery(settings))
    lock_ttl = max(5.0, 3 * settings.dispatch_interval_s)
    lock = client.lock(DISPATCH_LOCK_KEY, timeout=lock_ttl)
    token = _leader_token()
    leading = False
    next_recovery = 0.0
    log.info("dispatcher %s started", token)
    while not stop.is_set():
        try:
            leading = _hold_lock(lock, token, leading)
            if leading:
                # A wake-up only releases (milliseconds matter there); recovery runs once
                # per interval.
                recover = time.monotonic() >= next_recovery
                if recover:
                    next_recovery = time.monotonic() + settings.dispatch_interval_s
                report = dispatcher.run_pass(recover=recover)
                if report.released:
                    log.info("released %d job(s)", len(report.released))
                # Woken by a submission or a finished job, or tick: recovery must run
                # even when nothing happens.
                wait_for_wake(client, settings.dispatch_interval_s)
            else:
                # A standby must not swallow the wake-ups the active dispatcher waits for.
                stop.wait(settings.dispatch_interval_s)
        except (OperationalError, InterfaceError, redis.RedisError, BrokerError, OSError) as exc:
            log.warning("dispatch pass failed (%s); retrying", type(exc).__name__)
            stop.wait(settings.dispatch_interval_s)
    if leading:
        with contextlib.suppress(LockError, redis.RedisError):
            lock.release()
    resources.close()
    log.info("dispatcher %s stopped", token)
    return 0


def _hold_lock(lock: redis.lock.Lock, token: str, leading: bool) -> bool:
    """Keep or take the leader lock; True while this process leads."""
    if leading:
        try:
            lock.reacquire()
            return True
        except LockError:
            log.warning("dispatcher %s lost the leader lock", token)
            return False
    if lock.acquire(blocking=False, token=token):
        log.info("dispatcher %s is now the active dispatcher", token)
        return True
    return False
