"""API-key authentication and the `x-remaining-credits` header."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from flask import Response, g, request

from api.context import farm
from shared.accounts import Principal, authenticate
from shared.db import read_only
from shared.ledger import get_balance
from shared.pricing import format_credits

P = ParamSpec("P")
R = TypeVar("R")


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
            g.principal = authenticate(session, _presented_key())
        return view(*args, **kwargs)

    return wrapper


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
