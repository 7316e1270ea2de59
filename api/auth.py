"""API-key authentication and the `x-remaining-credits` header.

Keys are checked against the database on every request (no cache), so a revoked key is
refused from its next request on. Neither a key nor an Authorization header is ever logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from flask import Response, after_this_request, g, request
from sqlalchemy.orm import Session, sessionmaker

from api.context import farm
from shared.accounts.ledger import get_balance
from shared.accounts.pricing import format_credits
from shared.accounts.users import Principal, check_api_key, last_use_is_stale, record_key_use
from shared.db import read_only, transaction

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger(__name__)


def _presented_key() -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authenticated(view: Callable[P, R]) -> Callable[P, R]:
    """Require a valid API key; the caller is `current_principal()` inside the view."""

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with read_only(farm().sessions) as session:
            checked = check_api_key(session, _presented_key())
        g.principal = checked.principal
        if last_use_is_stale(checked.last_used_at):
            _record_use_after_response(checked.key_id)
        return view(*args, **kwargs)

    return wrapper


def _record_use_after_response(key_id: int) -> None:
    """Write the key's last use once the response is sent, so the write never delays it."""
    sessions = farm().sessions  # the app context is gone when the response closes

    @after_this_request
    def register(response: Response) -> Response:
        response.call_on_close(lambda: record_last_use(sessions, key_id))
        return response


def record_last_use(sessions: sessionmaker[Session], key_id: int) -> None:
    """Record a key's use in its own short transaction; a failure is logged, never raised."""
    try:
        with transaction(sessions) as session:
            record_key_use(session, key_id)
    except Exception as exc:
        # The key id, never the key: the request has been answered; only the record is lost.
        log.warning("could not record the use of API key #%d (%s)", key_id, type(exc).__name__)


def current_principal() -> Principal:
    """The authenticated caller of this request."""
    principal: Principal = g.principal
    return principal


def add_remaining_credits(response: Response) -> Response:
    """Stamp `x-remaining-credits` on every authenticated response."""
    principal: Principal | None = g.get("principal")
    if principal is None:
        return response
    balance: int | None = g.get("balance")
    if balance is None:
        try:
            with read_only(farm().sessions) as session:
                balance = get_balance(session, principal.user_id)
        except Exception:
            return response
    response.headers["x-remaining-credits"] = format_credits(balance)
    return response
