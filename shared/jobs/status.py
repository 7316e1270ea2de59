"""A request's status and result as every reader answers them: polls, streams, waits.

The status routes, the event stream's snapshots and the webhooks' bodies all come
from here (and `shared.jobs.bodies`), so a stream says exactly what a poll would.
"""

from __future__ import annotations

from datetime import datetime

from shared.accounts.users import Principal
from shared.clock import database_now
from shared.db import read_only
from shared.jobs.bodies import JobResult, JobStatus, result_of, status_body
from shared.jobs.events import read_progress
from shared.jobs.queries import ensure_results_retained, get_job
from shared.models import Job, JobState
from shared.resources import Resources
from shared.scheduling.fleet import fleet
from shared.scheduling.order import job_work
from shared.scheduling.positions import estimate_wait_seconds, queue_place


def read_status(resources: Resources, principal: Principal, job_id: str) -> tuple[Job, JobStatus]:
    """A job of the caller's tenant and its status: progress, queue position, ETA."""
    with read_only(resources.sessions) as session:
        job = get_job(session, principal, job_id)
        place = queue_place(session, job) if job.state == JobState.QUEUED.value else None
    running = job.state == JobState.RUNNING.value
    progress = read_progress(resources.redis, job.id) if running else None
    step = progress.step if progress else 0
    steps = progress.steps if progress else job.params["steps"]
    position: int | None = None
    eta: float | None = None
    if job.state in (JobState.QUEUED.value, JobState.RUNNING.value):
        workers, speed_of = fleet(resources.redis)
        speeds = list(speed_of.values())
        own_work = job_work(job)
        if place is not None:
            position = place.position
            eta = estimate_wait_seconds(place.work_ahead, own_work, speeds, len(workers))
        else:
            done = (job.images_done + step / max(1, steps)) / job.number_of_images
            eta = estimate_wait_seconds(0.0, own_work * (1 - min(1.0, done)), speeds, 1)
    body = status_body(job, step=step, steps=steps, queue_position=position, eta_seconds=eta)
    return job, body


def _load_retained_job(
    resources: Resources, principal: Principal, job_id: str
) -> tuple[Job, datetime]:
    """A job of the caller's tenant with its images, and the database's time it was read at.

    ResultsExpired past its retention, judged by that time (not this host's clock).
    """
    with read_only(resources.sessions) as session:
        job = get_job(session, principal, job_id)
        _ = job.images  # load while the session is open
        now = database_now(session)
    ensure_results_retained(job, now)
    return job, now


def load_retained_job(resources: Resources, principal: Principal, job_id: str) -> Job:
    """A job of the caller's tenant with its images loaded; ResultsExpired past retention.

    Any other tenant's job is not found.
    """
    return _load_retained_job(resources, principal, job_id)[0]


def read_result(
    resources: Resources, principal: Principal, job_id: str, base_url: str
) -> tuple[Job, JobResult]:
    """A job's result with fresh links under `base_url`; ResultsExpired past retention."""
    job, now = _load_retained_job(resources, principal, job_id)
    return job, result_of(job, resources.settings, resources.storage, base_url, now)
