"""Segmind-compatible routes: parse, call `shared`, serialize."""

from __future__ import annotations

import base64
import logging
from datetime import datetime, timedelta
from typing import Any

from flask import Blueprint, Response, after_this_request, g, request, url_for
from sqlalchemy import text

from api.auth import authenticated, current_principal
from api.context import farm
from api.errors import problem
from api.schemas import (
    Cancelled,
    Checks,
    Health,
    JobResult,
    JobStatus,
    Readiness,
    Submitted,
    SyncResult,
    UserCredits,
)
from api.spec import (
    PROBLEM_MEDIA_TYPE,
    Alternative,
    HeaderParameter,
    Problem,
    ResponseHeader,
    operation,
    respond,
)
from shared.accounts.ledger import get_balance
from shared.accounts.pricing import format_credits
from shared.clock import database_now
from shared.db import read_only, transaction
from shared.errors import InvalidLink, InvalidParams
from shared.jobs.bodies import (
    failure_fields,
    image_link,
)
from shared.jobs.events import wait_for_job
from shared.jobs.idempotency import HEADER as IDEMPOTENCY_HEADER
from shared.jobs.idempotency import (
    MAX_KEY_LENGTH,
    REPLAYED_HEADER,
    check_key,
)
from shared.jobs.params import CONTENT_TYPES, KolorsParams, parse_params
from shared.jobs.queries import ensure_results_retained, get_job, job_state, public_status
from shared.jobs.status import load_retained_job, read_result, read_status
from shared.jobs.submission import SubmitRequest, submit_request
from shared.jobs.transitions import cancel_job
from shared.links import signing_key, verify_image_link
from shared.models import TERMINAL_STATES, Job, JobState
from shared.scheduling.fleet import DISPATCH_LOCK_KEY, live_workers

log = logging.getLogger(__name__)
bp = Blueprint("kolors", __name__)

FAILED_HTTP_STATUS = 422  # Segmind serves FAILED bodies with 422; its SDK expects that.
IMAGE_MEDIA_TYPES = tuple(CONTENT_TYPES.values())

DEADLINE_HEADER = "X-Deadline-Seconds"
RETENTION_HEADER = "X-Retention-Seconds"

# The bounds the server enforces, from the app's settings, so the document states them.
DEADLINE = HeaderParameter(
    DEADLINE_HEADER,
    "Stop the job this many seconds after submission, like a cancel "
    "(above 0, at most the farm's maximum).",
    lambda settings: {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": settings.max_deadline_s,
    },
)
RETENTION = HeaderParameter(
    RETENTION_HEADER,
    "Keep the results this many seconds from submission (within the farm's bounds; "
    "default KOLORS_FARM_RESULT_RETENTION_S).",
    lambda settings: {
        "type": "number",
        "minimum": settings.min_retention_s,
        "maximum": settings.max_retention_s,
    },
)
SEED_HEADER = ResponseHeader("The image's seed.", {"type": "string", "pattern": "^[0-9]+$"})
IDEMPOTENCY_KEY = HeaderParameter(
    IDEMPOTENCY_HEADER,
    "Makes the submission safe to retry (IETF draft). A repeat with the same key and the "
    "same request (route and parameters as parsed: JSON or form, any key order, defaults "
    "explicit or not; the deadline and retention headers) within KOLORS_FARM_IDEMPOTENCY_TTL_S "
    "answers the same request, with no new hold or charge, marked `Idempotent-Replayed: true`. "
    "Keys are per user: 1 to 255 visible ASCII characters.",
    lambda settings: {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_KEY_LENGTH,
        "pattern": "^[!-~]+$",
    },
)
REPLAYED = ResponseHeader(
    "`true` when this answers again the request an earlier submission with the same "
    "Idempotency-Key created.",
    {"type": "string", "enum": ["true"]},
)
IN_PROGRESS = Alternative(
    "A request with this Idempotency-Key is still being created: retry after Retry-After "
    "seconds for its answer",
    Problem,
    (PROBLEM_MEDIA_TYPE,),
    {
        "Retry-After": ResponseHeader(
            "Seconds to wait before retrying.",
            {"type": "string", "pattern": "^[0-9]+$"},
            required=True,
        )
    },
)
KEY_REUSED = (
    "The Idempotency-Key was first used with another request (rule `idempotency_key_reused`)"
)
FAILED_STATUS = "The request FAILED (or was cancelled): the same body, with `error`."
SUBMISSION_ERRORS = (400, 401, 406, 413, 429, 503)
BODY_MEDIA_TYPES = ("application/json", "application/x-www-form-urlencoded")


def _request_fields() -> dict[str, Any]:
    """The request's parameters from a JSON object or form data, as sent."""
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise InvalidParams.single("body", "json_object", "must be a JSON object")
        return body
    fields: dict[str, Any] = request.form.to_dict(flat=True)
    if len(events := request.form.getlist("webhook_events_filter")) > 1:
        fields["webhook_events_filter"] = events  # repeated form fields: every event
    return fields


def _seconds_header(name: str, low: float, high: float, low_inclusive: bool) -> timedelta | None:
    """An optional header holding a number of seconds within [low, high] (or (low, high])."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    above_low = seconds >= low if low_inclusive else seconds > low
    if not (above_low and seconds <= high):  # also refuses NaN and infinity
        bound = "at least" if low_inclusive else "above"
        raise InvalidParams.single(
            name, "range", f"must be a number of seconds {bound} {low:g} and at most {high:g}"
        )
    return timedelta(seconds=seconds)


def _deadline() -> timedelta | None:
    """The optional per-request deadline, in seconds from submission."""
    return _seconds_header(DEADLINE_HEADER, 0, farm().settings.max_deadline_s, False)


def _retention() -> timedelta:
    """How long the results are kept: the request's header within bounds, or the default."""
    settings = farm().settings
    asked = _seconds_header(
        RETENTION_HEADER, settings.min_retention_s, settings.max_retention_s, True
    )
    return asked or timedelta(seconds=settings.result_retention_s)


def _submit_once(route: str, params: KolorsParams) -> Job:
    """Submit, or with an `Idempotency-Key` seen before, find the request it created."""
    key = check_key(request.headers.getlist(IDEMPOTENCY_HEADER))
    asked = SubmitRequest(
        principal=current_principal(),
        route=route,
        params=params,
        deadline=_deadline(),
        retention=_retention(),
        idempotency_key=key,
    )
    submission = submit_request(farm(), asked)
    g.balance = submission.balance
    if submission.replayed:

        @after_this_request
        def replayed(response: Response) -> Response:
            response.headers[REPLAYED_HEADER] = "true"
            return response

    return submission.job


def external_url(endpoint: str, **values: Any) -> str:
    """An absolute URL of `endpoint`: under the configured public base, or the request's host."""
    base = farm().settings.public_base_url
    if base:
        return base.rstrip("/") + url_for(endpoint, **values)
    return url_for(endpoint, _external=True, **values)


def _job_urls(job_id: str) -> dict[str, str]:
    status_url = external_url("kolors.job_status", job_id=job_id)
    return {
        "status_url": status_url,
        "response_url": external_url("kolors.job_result", job_id=job_id),
        "poll_url": status_url,
    }


def _load_retained_job(job_id: str) -> Job:
    return load_retained_job(farm(), current_principal(), job_id)


def _answer(body: JobStatus | JobResult, job: Job) -> Response:
    failed = public_status(job) == "FAILED"
    return respond(body, FAILED_HTTP_STATUS if failed else 200)


@bp.post("/v1/kolors")
@operation(
    summary="Render and wait",
    description="Answers the first image's bytes (Content-Type per output_format); "
    "`Accept: application/json` or `base64=true` answers JSON with every image in base64. "
    "A render that outlasts the synchronous wait goes on: the 504 names its status URL.",
    response=SyncResult,
    response_media_types={
        **dict.fromkeys(IMAGE_MEDIA_TYPES),
        "application/json": SyncResult,
    },
    response_description="The first image's bytes, or JSON with every image",
    response_headers={
        "x-request-id": ResponseHeader("The request's id (image answers)."),
        "x-seed": SEED_HEADER,
        REPLAYED_HEADER: REPLAYED,
    },
    errors=(*SUBMISSION_ERRORS, 410, 504),
    alternatives={
        409: IN_PROGRESS,
        FAILED_HTTP_STATUS: Alternative(
            f"The request FAILED (or was cancelled); or: {KEY_REUSED}",
            Problem,
            (PROBLEM_MEDIA_TYPE,),
        ),
    },
    body=KolorsParams,
    body_media_types=BODY_MEDIA_TYPES,
    headers=(DEADLINE, RETENTION, IDEMPOTENCY_KEY),
    tags=("render",),
    operation_id="renderSync",
)
@authenticated
def kolors_sync() -> Response:
    """Render and wait; answer the first image's bytes, or JSON with every image."""
    params = parse_params(_request_fields())
    want_json = params.base64 or request.accept_mimetypes.best == "application/json"
    job = _submit_once("/v1/kolors", params)
    context = farm()

    def finished() -> bool:
        with read_only(context.sessions) as session:
            return job_state(session, job.id) in TERMINAL_STATES

    if not wait_for_job(context.redis, job.id, finished, context.settings.sync_timeout_s):
        return problem(
            504,
            "Timed out",
            "The render did not finish in time; it goes on, poll the status URL",
            request_id=job.id,
            **_job_urls(job.id),
        )
    job = _load_retained_job(job.id)  # a replay may come after the retention
    if public_status(job) == "FAILED" or not job.images:
        error, cancelled = failure_fields(job)
        extra = {"cancelled": True} if cancelled else {}
        return problem(
            FAILED_HTTP_STATUS,
            "Render failed",
            error or "Render failed",
            request_id=job.id,
            **extra,
        )
    images = [context.storage.get(image.storage_key) for image in job.images]
    if want_json:
        encoded = [base64.b64encode(data).decode("ascii") for data in images]
        return respond(
            SyncResult(
                request_id=job.id,
                status="COMPLETED",
                image=encoded[0],
                images=encoded,
                seeds=[image.seed for image in job.images],
                content_type=job.images[0].content_type,
            )
        )
    response = Response(images[0], mimetype=job.images[0].content_type)
    response.headers["x-request-id"] = job.id
    response.headers["x-seed"] = str(job.images[0].seed)
    return response


def _job_link(operation_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "parameters": {"job_id": "$response.body#/request_id", **extra},
    }


@bp.post("/v2/kolors")
@operation(
    summary="Queue a render",
    description="Answers at once with the request's id and the absolute URLs to poll.",
    response=Submitted,
    status=202,
    errors=SUBMISSION_ERRORS,
    alternatives={
        409: IN_PROGRESS,
        422: Alternative(KEY_REUSED, Problem, (PROBLEM_MEDIA_TYPE,)),
    },
    response_headers={REPLAYED_HEADER: REPLAYED},
    body=KolorsParams,
    body_media_types=BODY_MEDIA_TYPES,
    headers=(DEADLINE, RETENTION, IDEMPOTENCY_KEY),
    tags=("render",),
    operation_id="submitRender",
    links={
        "GetStatus": _job_link("getRequestStatus"),
        "GetResult": _job_link("getRequestResult"),
        "GetFirstImage": _job_link("getRequestImage", index="0"),
        "Cancel": _job_link("cancelRequest"),
    },
)
@authenticated
def kolors_async() -> Response:
    """Queue a render; answer its id and the URLs to poll."""
    job = _submit_once("/v2/kolors", parse_params(_request_fields()))
    return respond(Submitted(request_id=job.id, status="QUEUED", **_job_urls(job.id)), 202)


@bp.get("/v2/requests/<job_id>/status")
@operation(
    summary="A request's status, progress, queue position and ETA",
    response=JobStatus,
    errors=(401, 404, 503),
    alternatives={FAILED_HTTP_STATUS: Alternative(FAILED_STATUS, JobStatus)},
    tags=("requests",),
    operation_id="getRequestStatus",
)
@authenticated
def job_status(job_id: str) -> Response:
    """The job's state, progress, queue position and ETA; FAILED is served with 422."""
    job, body = read_status(farm(), current_principal(), job_id)
    return _answer(body, job)


def image_links(job: Job, expires_at: datetime) -> list[str]:
    """Fresh links to each delivered image of a job (its images loaded)."""
    context = farm()
    base = context.settings.public_base_url or request.url_root
    return [
        image_link(job, image, expires_at, context.settings, context.storage, base)
        for image in job.images
    ]


@bp.get("/v2/requests/<job_id>")
@operation(
    summary="A request's result",
    description="Fresh expiring image links, seeds, generation records and timings.",
    response=JobResult,
    errors=(401, 404, 410, 503),
    alternatives={FAILED_HTTP_STATUS: Alternative(FAILED_STATUS, JobResult)},
    tags=("requests",),
    operation_id="getRequestResult",
)
@authenticated
def job_result(job_id: str) -> Response:
    """The result: fresh expiring image links, seeds, generation records, timing metrics."""
    base = farm().settings.public_base_url or request.url_root
    job, body = read_result(farm(), current_principal(), job_id, base)
    return _answer(body, job)


def _image_response(job: Job, index: int) -> Response:
    image = next((image for image in job.images if image.index == index), None)
    if image is None:
        return problem(404, "Not found", f"Request {job.id!r} has no image {index}")
    response = Response(farm().storage.get(image.storage_key), mimetype=image.content_type)
    response.headers["x-seed"] = str(image.seed)
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@bp.get("/v2/requests/<job_id>/images/<int:index>")
@operation(
    summary="One image of a request",
    response_media_types=dict.fromkeys(IMAGE_MEDIA_TYPES),
    response_description="The image's bytes",
    response_headers={"x-seed": SEED_HEADER},
    errors=(401, 404, 410, 503),
    tags=("requests",),
    operation_id="getRequestImage",
)
@authenticated
def job_image(job_id: str, index: int) -> Response:
    """One delivered image's bytes, for a caller with an API key."""
    job = _load_retained_job(job_id)
    return _image_response(job, index)


@bp.get("/v2/results/<token>")
@operation(
    summary="One image through a signed, expiring link",
    description="No API key: the link is the credential. A tampered, re-targeted or expired "
    "link is a 403.",
    response_media_types=dict.fromkeys(IMAGE_MEDIA_TYPES),
    response_description="The image's bytes",
    response_headers={"x-seed": SEED_HEADER},
    errors=(403, 404, 410, 503),
    authenticated=False,
    tags=("requests",),
    operation_id="getResultImage",
)
def result_image(token: str) -> Response:
    """One image through a signed, expiring link (no API key: the link is the credential)."""
    link = verify_image_link(signing_key(farm().settings), token)
    with read_only(farm().sessions) as session:
        job = session.get(Job, link.job_id)
        if job is None or job.tenant_id != link.tenant_id:
            raise InvalidLink("This link is not valid")
        _ = job.images
        now = database_now(session)
    ensure_results_retained(job, now)
    return _image_response(job, link.index)


@bp.delete("/v2/requests/<job_id>")
@bp.post("/v2/requests/<job_id>/cancel")
@operation(
    summary="Cancel a request",
    description="A queued request ends now, a running one at its next step (images already "
    "delivered are kept and paid); repeats are harmless.",
    response=Cancelled,
    errors=(401, 404, 503),
    tags=("requests",),
    operation_id="cancelRequest",
)
@authenticated
def job_cancel(job_id: str) -> Response:
    """Cancel: a queued job ends now, a running one at its next step; repeats are harmless."""
    with transaction(farm().sessions) as session:
        before = get_job(session, current_principal(), job_id).state
        job = cancel_job(session, current_principal(), job_id)
    error, cancelled = failure_fields(job)
    detail = None
    if JobState(before) in TERMINAL_STATES:
        detail = f"The request had already ended ({public_status(job)}); nothing changed"
    elif job.state == JobState.RUNNING.value:
        detail = "Cancelling: the render stops at its next step"
        cancelled = True
    return respond(
        Cancelled(
            request_id=job.id,
            status=public_status(job),
            error=error,
            cancelled=cancelled,
            detail=detail,
        )
    )


@bp.get("/v1/get-user-credits")
@operation(
    summary="The caller's credits",
    response=UserCredits,
    errors=(401, 503),
    tags=("account",),
    operation_id="getUserCredits",
)
@authenticated
def user_credits() -> Response:
    """The caller's spendable credits."""
    with read_only(farm().sessions) as session:
        g.balance = get_balance(session, current_principal().user_id)
    return respond(UserCredits(credits=format_credits(g.balance)))


@bp.get("/healthz")
@operation(summary="Liveness", response=Health, tags=("operations",), operation_id="getHealth")
def healthz() -> Response:
    """Liveness: the process answers."""
    return respond(Health(status="ok"))


@bp.get("/readyz")
@operation(
    summary="Readiness",
    description="The database and Redis answer; lists live workers and the active dispatcher.",
    response=Readiness,
    alternatives={503: Alternative("Not ready: a backing service is down", Readiness)},
    tags=("operations",),
    operation_id="getReadiness",
)
def readyz() -> Response:
    """Readiness: the database and Redis answer; lists live workers."""
    context = farm()
    database = redis_check = "ok"
    try:
        with context.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        database = f"unavailable ({type(exc).__name__})"
    workers: dict[str, Any] = {}
    dispatcher = None
    try:
        context.redis.ping()
        workers = live_workers(context.redis)
        leader = context.redis.get(DISPATCH_LOCK_KEY)
        dispatcher = leader.decode() if isinstance(leader, bytes) else None
    except Exception as exc:
        redis_check = f"unavailable ({type(exc).__name__})"
    ready = database == redis_check == "ok"
    body = Readiness(
        ready=ready,
        checks=Checks(database=database, redis=redis_check),
        workers=workers,
        dispatcher=dispatcher,
    )
    return respond(body, 200 if ready else 503)
