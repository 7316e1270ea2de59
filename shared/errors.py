"""Domain errors; the API maps each to an HTTP status and a JSON body."""

from __future__ import annotations

from dataclasses import dataclass


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
