"""One delivery attempt: POST the signed body to the address the guard checked; a capped read."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import httpx

from shared.models import (
    utcnow,
)
from shared.settings import Settings
from shared.webhooks.secrets import sign
from shared.webhooks.urls import WebhookRefused, allowed_networks, resolve_target

ERROR_LENGTH: Final = 500
RESPONSE_CAP_BYTES: Final = 4096


RETRYABLE_STATUSES: Final = frozenset({408, 429})


USER_AGENT: Final = "kolors-farm-webhooks/1"


@dataclass(frozen=True)
class Prepared:
    """Everything an attempt needs, read in one short transaction (none is held while sending)."""

    delivery_id: str
    tenant_id: int
    url: str
    event: str
    body: str
    secrets: list[str]
    skip: str | None = None  # DISABLED: the URL answered 410 before; nothing is sent


@dataclass(frozen=True)
class Outcome:
    """What one HTTP attempt gave: a status code, or an error (no answer)."""

    status_code: int | None
    latency_ms: int
    error: str | None

    @property
    def retryable(self) -> bool:
        """Timeouts, connection errors, 5xx, 408 and 429 are tried again later."""
        code = self.status_code
        return code is None or code >= 500 or code in RETRYABLE_STATUSES

    @property
    def delivered(self) -> bool:
        """A 2xx answer."""
        return self.status_code is not None and 200 <= self.status_code < 300


def post(prepared: Prepared, settings: Settings, client: httpx.Client) -> Outcome:
    """POST the signed body to the checked address; never follows a redirect."""
    started = time.monotonic()
    try:
        target = resolve_target(prepared.url, allowed_networks(settings))
    except WebhookRefused as exc:
        return Outcome(None, 0, f"refused: {exc.message}"[:ERROR_LENGTH])
    timestamp = utcnow()
    headers = {
        "host": target.host_header,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": prepared.delivery_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": sign(prepared.secrets, prepared.delivery_id, timestamp, prepared.body),
    }
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    deadline = started + settings.webhook_timeout_s
    try:
        with client.stream(
            "POST",
            target.connect_url,
            content=prepared.body.encode("utf-8"),
            headers=headers,
            extensions=extensions,
            follow_redirects=False,
        ) as response:
            text = _read_capped(response, deadline)
            code = response.status_code
    except httpx.TimeoutException:
        return Outcome(None, _ms(started), "timed out")
    except httpx.HTTPError as exc:
        return Outcome(None, _ms(started), f"{type(exc).__name__}: {exc}"[:ERROR_LENGTH])
    error = None
    if not 200 <= code < 300:
        error = f"HTTP {code}: {text}"[:ERROR_LENGTH] if text else f"HTTP {code}"
    return Outcome(code, _ms(started), error)


def _read_capped(response: httpx.Response, deadline: float) -> str:
    """At most RESPONSE_CAP_BYTES of the answer, and only until the attempt's deadline."""
    data = b""
    for chunk in response.iter_raw():
        data += chunk
        if len(data) >= RESPONSE_CAP_BYTES or time.monotonic() > deadline:
            break
    return data[:RESPONSE_CAP_BYTES].decode("utf-8", errors="replace").strip()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def http_client(settings: Settings) -> httpx.Client:
    """The delivery worker's HTTP client: the webhook timeout, no redirects, no proxies."""
    return httpx.Client(
        timeout=httpx.Timeout(settings.webhook_timeout_s),
        follow_redirects=False,
        trust_env=False,
    )
