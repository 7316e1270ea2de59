"""A request's status and result bodies: one builder for the API's answers and for webhooks.

The API serves these models from its routes; the webhook delivery worker, which
runs without Flask, sends the very same bodies, so the two can never drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.jobs.queries import public_status, results_expired
from shared.links import ImageLink, sign_image_link, signing_key
from shared.models import Job, JobImage, JobState, utcnow
from shared.settings import Settings
from shared.storage import ResultStorage

PublicStatus = Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]

# The route serving an image through a signed link (api.views.result_image).
RESULT_LINK_PATH = "/v2/results/{token}"


class Progress(BaseModel):
    """How far a render is."""

    images_done: int = Field(ge=0)
    images: int = Field(ge=1)
    step: int = Field(ge=0, description="Step of the image being rendered.")
    steps: int = Field(ge=1)


class JobStatus(BaseModel):
    """A request's state, progress, queue position and ETA (FAILED is served with 422)."""

    request_id: str
    status: PublicStatus
    error: str | None = Field(default=None, description="Why it FAILED (null otherwise).")
    cancelled: bool = Field(default=False, description="FAILED because it was cancelled.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    queue_position: int | None = Field(
        default=None, ge=0, description="QUEUED only: jobs the farm starts before this one."
    )
    eta_seconds: float | None = Field(
        default=None,
        ge=0,
        description="QUEUED or PROCESSING: estimated seconds until done, from measured speed "
        "(null when no worker has measured its speed yet).",
    )


class Output(BaseModel):
    """One delivered image: its expiring link, seed and generation record."""

    url: str
    expires_at: datetime
    index: int = Field(ge=0)
    seed: int = Field(ge=0)
    generation: dict[str, Any] | None = Field(description="The record embedded in the image.")
    cached: bool = Field(
        default=False,
        description="Answered from the result cache (an identical image the farm already "
        "held), not rendered for this request.",
    )


class Metrics(BaseModel):
    """Timing of a request, in seconds (each present once known)."""

    queue_seconds: float | None = None
    render_seconds: float | None = None
    total_seconds: float | None = None


class JobResult(BaseModel):
    """A request's result: fresh expiring image links, seeds, generation records, timings."""

    request_id: str
    status: PublicStatus
    output: list[str] = Field(description="Image links (Segmind's field), valid until expiry.")
    output_expires_at: datetime
    outputs: list[Output]
    seeds: list[int]
    metrics: Metrics
    parameters: dict[str, Any] = Field(description="The parameters, with the seed used.")
    results_expire_at: datetime | None = Field(description="When the results are deleted.")
    error: str | None = None
    cancelled: bool = False


def failure_fields(job: Job) -> tuple[str | None, bool]:
    """A job's `error` and `cancelled` fields: why it FAILED, and whether by a cancel."""
    if job.state == JobState.CANCELLED.value:
        return job.error or "Cancelled", True
    if job.state == JobState.FAILED.value:
        return job.error or "Render failed", False
    return None, False


def links_expire_at(job: Job, settings: Settings) -> datetime:
    """When links made now to a job's images expire: the link lifetime, within retention."""
    # This host's clock: the API that signs a link checks it (shared.links); retention
    # itself is checked on the database's clock wherever an image is served.
    expires_at = utcnow() + timedelta(seconds=settings.url_ttl_s)
    if job.expires_at is not None:
        expires_at = min(expires_at, job.expires_at)
    return expires_at


def image_link(
    job: Job,
    image: JobImage,
    expires_at: datetime,
    settings: Settings,
    storage: ResultStorage,
    base_url: str,
) -> str:
    """A URL serving one image without credentials until `expires_at`.

    S3 presigns its own; local disk gets a signed farm link under `base_url`
    (a path alone when `base_url` is empty).
    """
    lifetime = max(1, int((expires_at - utcnow()).total_seconds()))
    presigned = storage.presigned_url(image.storage_key, lifetime)
    if presigned is not None:
        return presigned
    link = ImageLink(job.tenant_id, job.id, image.index, int(expires_at.timestamp()))
    token = sign_image_link(signing_key(settings), link)
    return base_url.rstrip("/") + RESULT_LINK_PATH.format(token=token)


def status_body(
    job: Job,
    *,
    step: int = 0,
    steps: int | None = None,
    queue_position: int | None = None,
    eta_seconds: float | None = None,
) -> JobStatus:
    """A job's status body; live progress, position and ETA are the caller's to read."""
    error, cancelled = failure_fields(job)
    return JobStatus(
        request_id=job.id,
        status=public_status(job),
        error=error,
        cancelled=cancelled,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        progress=Progress(
            images_done=job.images_done,
            images=job.number_of_images,
            step=step,
            steps=steps if steps is not None else job.params["steps"],
        ),
        queue_position=queue_position,
        eta_seconds=round(eta_seconds, 1) if eta_seconds is not None else None,
    )


def result_body(
    job: Job, images: Sequence[JobImage], links: Sequence[str], expires_at: datetime
) -> JobResult:
    """A job's result body: `images` with their `links`, valid until `expires_at`."""
    metrics = Metrics()
    if job.started_at:
        metrics.queue_seconds = round((job.started_at - job.created_at).total_seconds(), 3)
    if job.finished_at and job.started_at:
        metrics.render_seconds = round((job.finished_at - job.started_at).total_seconds(), 3)
    if job.finished_at:
        metrics.total_seconds = round((job.finished_at - job.created_at).total_seconds(), 3)
    error, cancelled = failure_fields(job)
    return JobResult(
        request_id=job.id,
        status=public_status(job),
        output=list(links),
        output_expires_at=expires_at,
        outputs=[
            Output(
                url=link,
                expires_at=expires_at,
                index=image.index,
                seed=image.seed,
                generation=image.generation,
                cached=image.cached,
            )
            for link, image in zip(links, images, strict=True)
        ],
        seeds=[image.seed for image in images],
        metrics=metrics,
        parameters=job.params | {"seed": job.seed},
        results_expire_at=job.expires_at,
        error=error,
        cancelled=cancelled,
    )


def result_of(
    job: Job, settings: Settings, storage: ResultStorage, base_url: str, now: datetime
) -> JobResult:
    """A loaded job's result body with fresh links under `base_url` (none once expired at `now`).

    `now` is the database's time (`shared.clock.database_now`), read when the job was.
    """
    expires_at = links_expire_at(job, settings)
    images = [] if results_expired(job, now) else list(job.images)
    links = [image_link(job, image, expires_at, settings, storage, base_url) for image in images]
    return result_body(job, images, links, expires_at)
