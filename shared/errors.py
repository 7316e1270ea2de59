"""Domain errors; the API maps each to an HTTP status and a JSON body."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel, ValidationError


class FarmError(Exception):
    """Base class of every error the domain raises on purpose."""

    status = 500
    title = "Internal error"
    retry_after_s: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class FieldProblem:
    """One rule one field broke."""

    field: str
    rule: str
    message: str


class InvalidParams(FarmError):
    """The request's parameters break the schema."""

    status = 400
    title = "Invalid parameters"

    def __init__(self, problems: list[FieldProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))

    @classmethod
    def single(cls, field: str, rule: str, message: str) -> InvalidParams:
        """One problem with one field."""
        return cls([FieldProblem(field=field, rule=rule, message=message)])


# pydantic's own wording of these rules speaks of its models, not of the request.
_RULE_MESSAGES: Final = {
    "missing": "is required",
    "extra_forbidden": "is not a parameter of this route",
}


def field_problems(
    exc: ValidationError,
    model: type[BaseModel],
    whole: str,
    *,
    top_level: bool = False,
    explain: Callable[[FieldProblem], FieldProblem] | None = None,
) -> list[FieldProblem]:
    """What a pydantic ValidationError of `model` says, as one problem per field and rule.

    A field is named as the client sent it (its alias) and dotted into lists and
    objects (`webhook_events_filter.0`); `whole` names the input itself (a problem
    with no field). `top_level` names only the outer field (a union's members each
    report under their own type's name otherwise). `explain` may reword a problem
    in the terms of its domain; a field breaking one rule twice is listed once.
    """
    aliases = {name: info.alias or name for name, info in model.model_fields.items()}
    problems: dict[tuple[str, str], FieldProblem] = {}
    for error in exc.errors(include_url=False):
        parts = [str(part) for part in error["loc"]]
        if parts and parts[0] in aliases:
            parts[0] = aliases[parts[0]]
        field = (parts[0] if top_level else ".".join(parts)) if parts else whole
        rule = error["type"]
        problem = FieldProblem(
            field=field, rule=rule, message=_RULE_MESSAGES.get(rule, error["msg"])
        )
        if explain is not None:
            problem = explain(problem)
        problems.setdefault((problem.field, problem.rule), problem)
    return list(problems.values())


class Unauthorized(FarmError):
    """No API key, or one that matches no active key."""

    status = 401
    title = "Unauthorized"


class NotEnoughCredits(FarmError):
    """The balance cannot cover the hold."""

    status = 406
    title = "Not enough credits"

    def __init__(self, message: str = "Not enough credits") -> None:
        super().__init__(message)


class JobNotFound(FarmError):
    """No such job for this tenant."""

    status = 404
    title = "Not found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"No request with id {job_id!r}")


class ResultsExpired(FarmError):
    """The job's results passed their retention and were (or are being) deleted."""

    status = 410
    title = "Gone"


class InvalidLink(FarmError):
    """A result link whose signature does not check out."""

    status = 403
    title = "Invalid link"


class ExpiredLink(FarmError):
    """A genuine result link past its expiry."""

    status = 403
    title = "Link expired"


class StaleAttempt(FarmError):
    """A write carried an attempt number (fencing token) the job no longer has."""

    status = 409
    title = "Stale attempt"


class NotFound(FarmError):
    """A named thing (user, tenant) does not exist."""

    status = 404
    title = "Not found"


class Conflict(FarmError):
    """A named thing already exists."""

    status = 409
    title = "Conflict"


class TooManyJobs(FarmError):
    """The user already has as many live jobs as the farm allows."""

    status = 429
    title = "Too many requests"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(FarmError):
    """A dependency (database, Redis, queue) cannot be reached."""

    status = 503
    title = "Service unavailable"

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
