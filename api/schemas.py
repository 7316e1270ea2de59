"""The typed bodies of the API's responses and query strings (the OpenAPI document's schemas)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The usage bodies are the domain's own (it builds them whole).
from shared.accounts.history import UsagePage as UsagePage
from shared.accounts.history import UsageRow as UsageRow
from shared.accounts.pricing import CREDITS_PATTERN, Credits

# The status and result bodies are shared with the webhook deliveries.
from shared.jobs.bodies import JobResult as JobResult
from shared.jobs.bodies import JobStatus as JobStatus
from shared.jobs.bodies import Metrics as Metrics
from shared.jobs.bodies import Output as Output
from shared.jobs.bodies import Progress as Progress
from shared.jobs.bodies import PublicStatus as PublicStatus


class Submitted(BaseModel):
    """A queued render: its id and where to poll (absolute URLs)."""

    request_id: str
    status: Literal["QUEUED"]
    status_url: str = Field(description="Poll this for the status.")
    response_url: str = Field(description="The result, once COMPLETED.")
    poll_url: str = Field(description="The same as status_url (Segmind's name).")


class SyncResult(BaseModel):
    """A synchronous render answered as JSON: every image in base64 with its seed."""

    request_id: str
    status: Literal["COMPLETED"]
    image: str = Field(description="The first image, base64.")
    images: list[str] = Field(description="Every image, base64, in order.")
    seeds: list[int] = Field(description="The seed of each image.")
    content_type: str = Field(description="The images' media type.")


class Cancelled(BaseModel):
    """A request after a cancel (repeats are harmless)."""

    request_id: str
    status: PublicStatus
    error: str | None = None
    cancelled: bool = Field(description="The request is cancelled or stops at its next step.")
    detail: str | None = None


class UserCredits(BaseModel):
    """The caller's spendable credits."""

    credits: Credits = Field(pattern=CREDITS_PATTERN)


class Health(BaseModel):
    """The process answers."""

    status: Literal["ok"]


class Checks(BaseModel):
    """Each backing service: "ok" or why not."""

    database: str
    redis: str


class Readiness(BaseModel):
    """Whether the API can serve: the database and Redis answer; live workers listed."""

    ready: bool
    checks: Checks
    workers: dict[str, Any] = Field(description="Live workers by name, with their heartbeat.")
    dispatcher: str | None = Field(description="The active dispatcher, if any.")


class Me(BaseModel):
    """The caller."""

    user: str
    tenant: str
    is_admin: bool
    credits: Credits = Field(pattern=CREDITS_PATTERN)


class RequestSummary(BaseModel):
    """One request of the tenant's history."""

    request_id: str
    status: PublicStatus
    user: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    prompt: str
    parameters: dict[str, Any] = Field(description="Every parameter, with the seed used.")
    number_of_images: int = Field(ge=1, le=10)
    images_done: int = Field(ge=0, le=10)
    error: str | None
    cancelled: bool
    output: list[str] = Field(
        description="Image links, as GET /v2/requests/{id} gives; empty once results expire."
    )
    cached: bool = Field(
        default=False, description="Answered from the result cache at submission, not rendered."
    )


class RequestPage(BaseModel):
    """A page of the tenant's requests, newest first."""

    requests: list[RequestSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: done.")


class RequestsQuery(BaseModel):
    """Query parameters of GET /v2/requests."""

    model_config = ConfigDict(extra="forbid")

    status: PublicStatus | None = Field(
        default=None, description="Only requests in this state (FAILED includes cancelled)."
    )
    limit: int = Field(default=20, ge=1, le=100, description="Requests per page.")
    cursor: str | None = Field(
        default=None, description="`next_cursor` of the previous page (empty: the first page)."
    )


class UsageQuery(BaseModel):
    """Query parameters of GET /v1/usage (both dates inclusive, UTC)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: date | None = Field(
        default=None,
        alias="from",
        description="First day, YYYY-MM-DD (default: 30 days before `to`).",
    )
    to: date | None = Field(default=None, description="Last day, YYYY-MM-DD (default: today).")
    limit: int = Field(default=100, ge=1, le=1000, description="Rows per page.")
    cursor: str | None = Field(
        default=None, description="`next_cursor` of the previous page (empty: the first page)."
    )
