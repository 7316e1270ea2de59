"""How a view describes itself to the OpenAPI document, and how it answers typed bodies.

Every documented route carries `@operation(...)` below its Flask route decorator;
`api.openapi` walks the app's url_map and documents each view carrying it, so
routes of any blueprint are picked up. Views answer pydantic models with
`respond(model)`, so the document and the wire come from the same classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from flask import Response, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import InvalidParams, field_problems
from shared.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)

OPERATION_ATTRIBUTE: Final = "__openapi_operation__"
PROBLEM_MEDIA_TYPE: Final = "application/problem+json"


class FieldError(BaseModel):
    """One rule one field (or parameter, or header) broke."""

    field: str = Field(description="The body field, query parameter or header at fault.")
    rule: str = Field(description="The rule it broke, e.g. `less_than_equal` or `range`.")
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem document, plus Segmind's `error` string (its SDK reads that)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    error: str = Field(description="What went wrong (Segmind's field; equals `detail`).")
    type: str = "about:blank"
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    errors: list[FieldError] | None = Field(
        default=None, description="400 only: every field that broke a rule, with the rule."
    )
    request_id: str | None = Field(
        default=None, description="The request concerned (a FAILED or timed-out render)."
    )
    cancelled: bool | None = Field(default=None, description="A FAILED render was cancelled.")
    status_url: str | None = Field(default=None, description="504: where to poll on.")
    response_url: str | None = None
    poll_url: str | None = None


@dataclass(frozen=True)
class HeaderParameter:
    """A request header a route reads; its schema may depend on the farm's settings."""

    name: str
    description: str
    schema: Callable[[Settings], dict[str, Any]]


@dataclass(frozen=True)
class ResponseHeader:
    """A header a response carries."""

    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True)
class Alternative:
    """One more response of an operation besides its success and its problem errors."""

    description: str
    model: type[BaseModel] | None = None
    media_types: tuple[str, ...] = ("application/json",)
    headers: Mapping[str, ResponseHeader] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    """What the OpenAPI document says about one view."""

    summary: str
    response: type[BaseModel] | None
    status: int
    errors: tuple[int, ...]
    query: type[BaseModel] | None
    body: type[BaseModel] | None
    tags: tuple[str, ...]
    description: str | None = None
    operation_id: str | None = None
    authenticated: bool | None = None
    body_media_types: tuple[str, ...] = ("application/json",)
    response_media_types: Mapping[str, type[BaseModel] | None] | None = None
    response_description: str | None = None
    response_headers: Mapping[str, ResponseHeader] = field(default_factory=dict)
    headers: tuple[HeaderParameter, ...] = ()
    alternatives: Mapping[int, Alternative] = field(default_factory=dict)
    links: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def secured(self) -> bool:
        """Whether the route needs an API key (by default: it can answer 401)."""
        return self.authenticated if self.authenticated is not None else 401 in self.errors


def operation(
    *,
    summary: str,
    response: type[BaseModel] | None = None,
    status: int = 200,
    errors: Sequence[int] = (),
    query: type[BaseModel] | None = None,
    body: type[BaseModel] | None = None,
    tags: Sequence[str] = (),
    description: str | None = None,
    operation_id: str | None = None,
    authenticated: bool | None = None,
    body_media_types: Sequence[str] = ("application/json",),
    response_media_types: Mapping[str, type[BaseModel] | None] | None = None,
    response_description: str | None = None,
    response_headers: Mapping[str, ResponseHeader] | None = None,
    headers: Sequence[HeaderParameter] = (),
    alternatives: Mapping[int, Alternative] | None = None,
    links: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[F], F]:
    """Document a view in the OpenAPI document (put it below the route decorator).

    `response` is the success body's model (None: no JSON body) answered with
    `status`; `errors` the problem+json statuses the route may answer; `query`
    and `body` the models of the query parameters and the JSON body. The route
    needs an API key when it can answer 401 (or `authenticated=True`).
    `response_media_types` replaces the success content (e.g. image bytes or
    JSON: {"image/png": None, "application/json": Model}); `alternatives` adds
    non-problem responses (e.g. a FAILED status served with 422); `links` are
    OpenAPI links from the success response, by name.
    """
    spec = Operation(
        summary=summary,
        response=response,
        status=status,
        errors=tuple(errors),
        query=query,
        body=body,
        tags=tuple(tags),
        description=description,
        operation_id=operation_id,
        authenticated=authenticated,
        body_media_types=tuple(body_media_types),
        response_media_types=response_media_types,
        response_description=response_description,
        response_headers=dict(response_headers or {}),
        headers=tuple(headers),
        alternatives=dict(alternatives or {}),
        links=dict(links or {}),
    )

    def decorate(view: F) -> F:
        setattr(view, OPERATION_ATTRIBUTE, spec)
        return view

    return decorate


def operation_of(view: Callable[..., Any]) -> Operation | None:
    """The view's `operation` metadata, if it has any."""
    spec = getattr(view, OPERATION_ATTRIBUTE, None)
    return spec if isinstance(spec, Operation) else None


def respond(model: BaseModel, status: int = 200) -> Response:
    """A JSON response of a pydantic model (every field, named by field name)."""
    return Response(model.model_dump_json(), status=status, mimetype="application/json")


def parse_query(model: type[M]) -> M:
    """The request's query parameters validated by `model`; a 400 names each bad one."""
    values: dict[str, Any] = {}
    for name in request.args:
        given = request.args.getlist(name)
        values[name] = given if len(given) > 1 else given[0]
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise InvalidParams(field_problems(exc, model, "query")) from None
