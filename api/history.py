"""The caller's account, the tenant's request history and its daily credit usage."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Final

from flask import Blueprint, Response, g, request

from api.auth import authenticated, current_principal
from api.context import farm
from api.schemas import (
    Me,
    RequestPage,
    RequestsQuery,
    RequestSummary,
    UsagePage,
    UsageQuery,
    UsageRow,
)
from api.spec import ResponseHeader, operation, parse_query, respond
from api.views import image_links
from shared.accounts.history import (
    account,
    decode_history_cursor,
    decode_usage_cursor,
    encode_history_cursor,
    request_page,
    usage_page,
    usage_window,
)
from shared.accounts.pricing import format_credits
from shared.clock import database_now
from shared.db import read_only
from shared.jobs.bodies import failure_fields, links_expire_at
from shared.jobs.queries import public_status, results_expired
from shared.models import Job, utcnow

bp = Blueprint("history", __name__)

CSV_COLUMNS: Final = ("day", "user", "granted", "held", "captured", "released")
NEXT_CURSOR_HEADER: Final = "X-Next-Cursor"


@bp.get("/v1/me")
@operation(
    summary="Who the API key belongs to",
    response=Me,
    errors=(401, 503),
    tags=("account",),
    operation_id="getMe",
)
@authenticated
def me() -> Response:
    """The caller: user, tenant, whether an admin, and spendable credits."""
    with read_only(farm().sessions) as session:
        caller = account(session, current_principal().user_id)
    g.balance = caller.balance
    return respond(
        Me(
            user=caller.user,
            tenant=caller.tenant,
            is_admin=caller.is_admin,
            credits=format_credits(caller.balance),
        )
    )


def _summary(job: Job, user: str, now: datetime) -> RequestSummary:
    error, cancelled = failure_fields(job)
    links: list[str] = []
    if job.images and not results_expired(job, now):
        links = image_links(job, links_expire_at(job, farm().settings))
    return RequestSummary(
        request_id=job.id,
        status=public_status(job),
        user=user,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        prompt=job.params.get("prompt", ""),
        parameters=job.params | {"seed": job.seed},
        number_of_images=job.number_of_images,
        images_done=job.images_done,
        error=error,
        cancelled=cancelled,
        output=links,
        cached=any(image.cached for image in job.images),
    )


@bp.get("/v2/requests")
@operation(
    summary="The tenant's requests, newest first",
    description="Keyset-paginated: pass `next_cursor` back as `cursor` until it is null. "
    "`status=FAILED` includes cancelled requests.",
    response=RequestPage,
    errors=(400, 401, 503),
    query=RequestsQuery,
    tags=("requests",),
    operation_id="listRequests",
)
@authenticated
def list_requests() -> Response:
    """A page of the tenant's requests (any user's), newest first."""
    query = parse_query(RequestsQuery)
    after = decode_history_cursor(query.cursor) if query.cursor else None  # empty: page one
    with read_only(farm().sessions) as session:
        page = request_page(
            session, current_principal().tenant_id, query.status, query.limit, after
        )
        now = database_now(session)
    summaries = [_summary(job, page.user_names.get(job.user_id, ""), now) for job in page.jobs]
    cursor = encode_history_cursor(page.next_key) if page.next_key else None
    return respond(RequestPage(requests=summaries, next_cursor=cursor))


def _usage_csv(rows: list[UsageRow], cursor: str | None) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(
            [row.day.isoformat(), row.user, row.granted, row.held, row.captured, row.released]
        )
    response = Response(out.getvalue(), mimetype="text/csv")
    if cursor is not None:
        response.headers[NEXT_CURSOR_HEADER] = cursor
    return response


@bp.get("/v1/usage")
@operation(
    summary="The tenant's credit usage per day and user",
    description="Credits granted, held, captured and released per UTC day and user, from "
    "`from` to `to` (inclusive, at most 366 days). `Accept: text/csv` answers the same rows "
    "as CSV (header day,user,granted,held,captured,released; the next cursor in "
    "X-Next-Cursor). Keyset-paginated by day then user.",
    response=UsagePage,
    response_media_types={"application/json": UsagePage, "text/csv": None},
    response_headers={
        NEXT_CURSOR_HEADER: ResponseHeader("CSV answers: the cursor of the next page, if any.")
    },
    errors=(400, 401, 503),
    query=UsageQuery,
    tags=("account",),
    operation_id="getUsage",
)
@authenticated
def usage() -> Response:
    """A page of the tenant's daily usage, as JSON or CSV."""
    query = parse_query(UsageQuery)
    first, last = usage_window(query.from_, query.to, utcnow().date())
    after = decode_usage_cursor(query.cursor) if query.cursor else None  # empty: page one
    with read_only(farm().sessions) as session:
        page = usage_page(session, current_principal().tenant_id, first, last, query.limit, after)
    if request.accept_mimetypes.best_match(["application/json", "text/csv"]) == "text/csv":
        return _usage_csv(page.usage, page.next_cursor)
    return respond(page)
