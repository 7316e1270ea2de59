"""Operators' routes: workers, tenants' queues, users and balances, credit grants.

Only for API keys of users created with `kolors-farm users create NAME --admin`;
any other valid key gets 403, no key 401. Lists are keyset-paginated by name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final, ParamSpec, TypeVar

from flask import Blueprint, Response, request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from api.auth import authenticated, current_principal
from api.context import farm
from api.spec import operation, parse_query, respond
from shared.accounts.admin import (
    MAX_NOTE_CHARS,
    grant_to_user,
    not_a_decimal,
    parse_grant_amount,
    require_admin,
    tenant_page,
    user_page,
)
from shared.accounts.history import bad_cursor, decode_cursor, encode_cursor
from shared.accounts.pricing import format_credits
from shared.db import read_only, transaction
from shared.errors import FieldProblem, InvalidParams, field_problems
from shared.scheduling.fleet import DISPATCH_LOCK_KEY, fleet
from shared.webhooks.secrets import secrets_by_name

bp = Blueprint("admin", __name__)

P = ParamSpec("P")
R = TypeVar("R")

MIB: Final = 1024 * 1024
ADMIN_ERRORS: Final = (401, 403, 503)


def admin_only(view: Callable[P, R]) -> Callable[P, R]:
    """Require an operator's API key: 401 without a valid key, 403 for anyone else."""

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        require_admin(current_principal())
        return view(*args, **kwargs)

    return authenticated(wrapper)


# ---- models ---------------------------------------------------------------------------


class AdminWorker(BaseModel):
    """A live worker, as its last heartbeat described it."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    name: str
    device: str | None = Field(default=None, description="`cuda:0`, `cpu`, ...")
    device_name: str | None = Field(default=None, description="The GPU's model, or `cpu`.")
    host: str | None = None
    model: str | None = Field(default=None, description="The checkpoint it serves.")
    memory_total_mb: int | None = None
    memory_used_mb: int | None = None
    warm: bool = Field(description="Whether it has rendered its warm-up image.")
    busy_fraction: float | None = Field(
        description="Share of wall time its device spent rendering over the last minute."
    )
    busy_fraction_since_start: float | None = None
    current_job: str | None = Field(description="The request it is rendering, if any.")
    seconds_per_work_unit: float | None = Field(
        default=None, description="Measured speed: seconds per 1024x1024 image step."
    )


class AdminWorkers(BaseModel):
    """The live workers and the active dispatcher."""

    workers: list[AdminWorker]
    dispatcher: str | None = Field(description="The active dispatcher's name, if one is up.")


class PageQuery(BaseModel):
    """A page of a list ordered by name."""

    model_config = ConfigDict(extra="forbid")

    cursor: str | None = Field(
        default=None,
        max_length=400,
        description="`next_cursor` of the previous page (empty: the first page).",
    )
    limit: int = Field(default=50, ge=1, le=100, description="Rows per page.")


class AdminTenant(BaseModel):
    """A tenant's fair-share weight and queue."""

    name: str
    weight: int
    queued: int = Field(description="Requests waiting to be released to a worker.")
    running: int = Field(description="Requests released to a worker or rendering.")
    oldest_queued_at: datetime | None


class AdminTenantPage(BaseModel):
    """One page of tenants, by name."""

    tenants: list[AdminTenant]
    next_cursor: str | None


class AdminUser(BaseModel):
    """A user's tenant, spendable credits, role and weight."""

    name: str
    tenant: str
    credits: str = Field(description="Spendable credits, a decimal string.")
    is_admin: bool
    weight: int


class AdminUserPage(BaseModel):
    """One page of users, by name."""

    users: list[AdminUser]
    next_cursor: str | None


class GrantBody(BaseModel):
    """Credits to add to a user's balance."""

    model_config = ConfigDict(extra="forbid")

    credits: StrictStr | StrictInt | StrictFloat = Field(
        description='A positive decimal with at most three decimals, e.g. `"12.5"`.',
        examples=["12.5"],
    )
    note: str | None = Field(
        default=None,
        max_length=MAX_NOTE_CHARS - 100,
        description="Why (kept in the ledger with the granting admin's name).",
    )


class GrantResult(BaseModel):
    """The user's balance after the grant."""

    user: str
    credits: str = Field(description="Spendable credits after the grant, a decimal string.")


# ---- helpers --------------------------------------------------------------------------


def _encode_cursor(last_name: str) -> str:
    return encode_cursor({"after": last_name})


def _decode_cursor(cursor: str | None) -> str | None:
    """The name a cursor continues after; a 400 naming `cursor` for anything else."""
    if not cursor:
        return None
    after = decode_cursor(cursor).get("after")
    if not isinstance(after, str):
        raise bad_cursor()
    return after


def _parse_body(model: type[GrantBody]) -> GrantBody:
    """The JSON body validated by `model`; a 400 names each bad field and its rule."""
    body: Any = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidParams.single("body", "json_object", "must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        # Credits of any other type break the same rule as an amount that is no decimal.
        problems = field_problems(exc, model, "body", top_level=True, explain=_credits_problem)
        raise InvalidParams(problems) from None


def _credits_problem(problem: FieldProblem) -> FieldProblem:
    if problem.field == "credits" and problem.rule != "missing":
        return not_a_decimal()
    return problem


def _worker(name: str, info: dict[str, Any], speed: float | None) -> AdminWorker:
    fields = {
        key: value
        for key, value in info.items()
        if key not in {"job", "memory_total_bytes", "memory_free_bytes"}
    }
    total, free = info.get("memory_total_bytes"), info.get("memory_free_bytes")
    if isinstance(total, int):
        fields["memory_total_mb"] = total // MIB
        if isinstance(free, int):
            fields["memory_used_mb"] = (total - free) // MIB
    fields |= {
        "name": name,
        "warm": bool(info.get("warm", False)),
        "busy_fraction": info.get("busy_fraction"),
        "current_job": info.get("job"),
        "seconds_per_work_unit": speed,
    }
    return AdminWorker.model_validate(fields)


# ---- routes ---------------------------------------------------------------------------


@bp.get("/v1/admin/workers")
@operation(
    summary="Live workers and the active dispatcher (admins only)",
    response=AdminWorkers,
    errors=ADMIN_ERRORS,
    tags=("admin",),
)
@admin_only
def admin_workers() -> Response:
    """Every live worker's heartbeat (device, memory, warm, busy fraction, current job)."""
    client = farm().redis
    # The fleet is a few dozen entries at most, read in one round trip.
    workers, speeds = fleet(client)
    leader = client.get(DISPATCH_LOCK_KEY)
    return respond(
        AdminWorkers(
            workers=[
                _worker(name, info, speeds.get(name)) for name, info in sorted(workers.items())
            ],
            dispatcher=leader.decode() if isinstance(leader, bytes) else None,
        )
    )


@bp.get("/v1/admin/tenants")
@operation(
    summary="Tenants' queues by name (admins only)",
    response=AdminTenantPage,
    errors=(400, *ADMIN_ERRORS),
    query=PageQuery,
    tags=("admin",),
)
@admin_only
def admin_tenants() -> Response:
    """A page of tenants with their weights and queued and running requests."""
    query = parse_query(PageQuery)
    after = _decode_cursor(query.cursor)
    with read_only(farm().sessions) as session:
        rows = tenant_page(session, after, query.limit + 1)
    page, more = rows[: query.limit], len(rows) > query.limit
    return respond(
        AdminTenantPage(
            tenants=[
                AdminTenant(
                    name=row.name,
                    weight=row.weight,
                    queued=row.queued,
                    running=row.running,
                    oldest_queued_at=row.oldest_queued_at,
                )
                for row in page
            ],
            next_cursor=_encode_cursor(page[-1].name) if more else None,
        )
    )


@bp.get("/v1/admin/users")
@operation(
    summary="Users and balances by name (admins only)",
    response=AdminUserPage,
    errors=(400, *ADMIN_ERRORS),
    query=PageQuery,
    tags=("admin",),
)
@admin_only
def admin_users() -> Response:
    """A page of users with their tenants, credits, roles and weights."""
    query = parse_query(PageQuery)
    after = _decode_cursor(query.cursor)
    with read_only(farm().sessions) as session:
        rows = user_page(session, after, query.limit + 1)
    page, more = rows[: query.limit], len(rows) > query.limit
    return respond(
        AdminUserPage(
            users=[
                AdminUser(
                    name=row.name,
                    tenant=row.tenant,
                    credits=format_credits(row.balance),
                    is_admin=row.is_admin,
                    weight=row.weight,
                )
                for row in page
            ],
            next_cursor=_encode_cursor(page[-1].name) if more else None,
        )
    )


@bp.post("/v1/admin/users/<name>/credits")
@operation(
    summary="Grant credits to a user (admins only)",
    response=GrantResult,
    errors=(400, *ADMIN_ERRORS[:2], 404, 413, 503),
    body=GrantBody,
    tags=("admin",),
)
@admin_only
def admin_grant(name: str) -> Response:
    """Add credits to a user's balance (a ledger entry naming the admin); the new balance."""
    body = _parse_body(GrantBody)
    amount = parse_grant_amount(body.credits)
    with transaction(farm().sessions) as session:
        balance = grant_to_user(session, current_principal(), name, amount, body.note)
    return respond(GrantResult(user=name, credits=format_credits(balance)))


class AdminWebhookSecret(BaseModel):
    """A tenant's webhook signing secrets (Standard Webhooks, `whsec_...`)."""

    tenant: str
    secret: str = Field(description="The current secret, created on first view.")
    signing: list[str] = Field(
        description="Every secret that signs deliveries now, the current one first "
        "(two for 24 hours after `kolors-farm webhooks rotate`)."
    )


@bp.get("/v1/admin/tenants/<name>/webhook-secret")
@operation(
    summary="A tenant's webhook signing secret (admins only)",
    response=AdminWebhookSecret,
    errors=(*ADMIN_ERRORS[:2], 404, 503),
    tags=("admin",),
)
@admin_only
def admin_webhook_secret(name: str) -> Response:
    """The tenant's current signing secret (created if missing) and those still signing."""
    with transaction(farm().sessions) as session:
        signing = secrets_by_name(session, name)
    response = respond(AdminWebhookSecret(tenant=name, secret=signing[0], signing=signing))
    response.headers["Cache-Control"] = "no-store"
    return response
