"""Signed, expiring links to result images on local disk (S3 presigns its own).

A link's token carries the tenant, job, image index and expiry time, signed with
the farm's key (HMAC-SHA1 via itsdangerous, over a salt specific to this use).
Any change to the token (another job, another index, a later expiry) breaks the
signature; an intact token past its expiry is refused as expired.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from itsdangerous import BadSignature, URLSafeSerializer

from shared.errors import ExpiredLink, InvalidLink
from shared.settings import Settings

_SALT = "kolors-farm.result-image"
KEY_FILE = "url-signing.key"


@dataclass(frozen=True)
class ImageLink:
    """What a signed link grants: one image of one job of one tenant, until `expires_at`."""

    tenant_id: int
    job_id: str
    index: int
    expires_at: int  # Unix seconds


def signing_key(settings: Settings) -> str:
    """The configured key, or one generated once under the data dir (single-host farms)."""
    if settings.url_signing_key is not None:
        return settings.url_signing_key.get_secret_value()
    path = settings.data_dir / KEY_FILE
    if not path.exists():
        _create_key_file(path)
    return path.read_text().strip()


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process created it first; use theirs
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32))


def sign_image_link(key: str, link: ImageLink) -> str:
    """The URL-safe token for `link`."""
    serializer = URLSafeSerializer(key, salt=_SALT)
    return str(serializer.dumps([link.tenant_id, link.job_id, link.index, link.expires_at]))


def verify_image_link(key: str, token: str, now: datetime | None = None) -> ImageLink:
    """The link a token grants; InvalidLink if tampered with, ExpiredLink if too old."""
    serializer = URLSafeSerializer(key, salt=_SALT)
    try:
        tenant_id, job_id, index, expires_at = serializer.loads(token)
    except (BadSignature, TypeError, ValueError):
        raise InvalidLink("This link is not valid") from None
    link = ImageLink(
        tenant_id=int(tenant_id), job_id=str(job_id), index=int(index), expires_at=int(expires_at)
    )
    moment = (now or datetime.now(UTC)).timestamp()
    if moment >= link.expires_at:
        expired = datetime.fromtimestamp(link.expires_at, UTC).isoformat()
        raise ExpiredLink(
            f"This link expired at {expired}; fetch fresh links from GET /v2/requests/{link.job_id}"
        )
    return link
