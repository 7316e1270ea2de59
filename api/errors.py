"""JSON errors everywhere: Segmind's `error` string plus RFC 9457 problem fields."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, Response, jsonify
from sqlalchemy.exc import InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from api.spec import PROBLEM_MEDIA_TYPE
from shared.errors import FarmError, InvalidParams, ServiceUnavailable

log = logging.getLogger(__name__)


def problem_document(status: int, title: str, error: str, **extra: Any) -> dict[str, Any]:
    """The body of a problem (`api.spec.Problem`): Segmind's `error` plus RFC 9457 fields."""
    return {
        "error": error,
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": error,
        **extra,
    }


def problem(status: int, title: str, error: str, **extra: Any) -> Response:
    """A problem+json response (`api.spec.Problem`): Segmind's `error` plus RFC 9457 fields."""
    response = jsonify(problem_document(status, title, error, **extra))
    response.status_code = status
    response.content_type = PROBLEM_MEDIA_TYPE
    return response


def _farm_error(exc: FarmError) -> Response:
    extra: dict[str, Any] = {}
    if isinstance(exc, InvalidParams):
        extra["errors"] = [
            {"field": p.field, "rule": p.rule, "message": p.message} for p in exc.problems
        ]
    response = problem(exc.status, exc.title, exc.message, **extra)
    if exc.retry_after_s is not None:
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    messages = {
        404: "Not found",
        405: "Method not allowed",
        413: "Request body too large",
    }
    response = problem(status, exc.name, messages.get(status, exc.description or exc.name))
    if status == 405 and exc.get_response().headers.get("Allow"):
        response.headers["Allow"] = exc.get_response().headers["Allow"]
    return response


def _unavailable(exc: Exception) -> Response:
    log.warning("dependency unavailable: %s", type(exc).__name__)
    return _farm_error(ServiceUnavailable("A backing service is unavailable; retry shortly"))


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error")
    return problem(500, "Internal error", "Internal server error")


def register_error_handlers(app: Flask) -> None:
    """Map every error to a JSON body; nothing internal leaks."""
    app.register_error_handler(FarmError, _farm_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(OperationalError, _unavailable)
    app.register_error_handler(InterfaceError, _unavailable)
    app.register_error_handler(redis.RedisError, _unavailable)
    app.register_error_handler(Exception, _unexpected)
