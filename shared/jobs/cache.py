"""The result cache: an identical request is answered from images the farm already holds.

The farm renders deterministically: the same parameters, seed, weights, libraries and
numeric settings give the same bytes. So each rendered image carries a cache key, the
SHA-256 of a canonical JSON of those inputs, and a request whose every image has a key
that a retained image already carries is answered by copying those images under the new
request's own storage keys, in the submission's transaction: COMPLETED at once, no
dispatch, no worker.

The keys come from the render fingerprint of the workers (weights, library versions,
device type, dtype and the worker settings that change pixels), which each worker
publishes in its heartbeat. The API looks up only while every live worker publishes the
same fingerprint; a mixed fleet (a rolling upgrade) or an unknown one renders normally.

Copies carry no key (only renders do), so the rows one key indexes stay few: about one
per render, and a render happens only on a miss. Retention cleanup clears the keys of the
images it deletes, so the index holds keys of retained images only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any, Final, Literal

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from shared.clock import database_now
from shared.jobs.params import KolorsParams, image_seed
from shared.models import Job, JobImage
from shared.storage import ResultStorage

log = logging.getLogger(__name__)

KEY_VERSION: Final = 1
# The heartbeat field naming a worker's render fingerprint.
FINGERPRINT_FIELD: Final = "render_fingerprint"
# Request fields that do not change an image's bytes: the count (a key is per image), the
# seed (the image's own seed is keyed instead), and delivery options.
NOT_RENDER_INPUTS: Final = frozenset(
    {"number_of_images", "seed", "base64", "webhook", "webhook_events_filter"}
)
CacheScope = Literal["tenant", "farm"]


def _digest(value: Any) -> str:
    """SHA-256 hex of `value` as canonical JSON (sorted keys, no spaces, no NaN)."""
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_fingerprint(
    weights_sha256: str,
    versions: Mapping[str, str],
    *,
    device_type: str,
    dtype: str,
    options: Mapping[str, Any],
) -> str:
    """What, beside the request, decides a worker's pixels: weights, libraries, numerics."""
    return _digest(
        {
            "weights": weights_sha256,
            "versions": dict(versions),
            "device": device_type,
            "dtype": dtype,
            "options": dict(options),
        }
    )


def render_inputs(params: KolorsParams) -> dict[str, Any]:
    """The request's fields that decide an image's bytes (output format and quality too)."""
    return {
        name: value
        for name, value in params.render_fields().items()
        if name not in NOT_RENDER_INPUTS
    }


def cache_key(params: KolorsParams, seed: int, fingerprint: str) -> str:
    """The cache key of one image: its rendering inputs, its seed and the render fingerprint."""
    return _digest(
        {
            "v": KEY_VERSION,
            "params": render_inputs(params),
            "seed": seed,
            "fingerprint": fingerprint,
        }
    )


def image_cache_keys(params: KolorsParams, base_seed: int, fingerprint: str) -> list[str]:
    """The cache keys of a request's images, in order (image i uses seed + i)."""
    return [
        cache_key(params, image_seed(base_seed, index), fingerprint)
        for index in range(params.number_of_images)
    ]


def fleet_fingerprint(workers: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The live workers' shared fingerprint; None if none is live, one lacks it, or two differ."""
    found = {info.get(FINGERPRINT_FIELD) for info in workers.values()}
    if len(found) != 1:
        return None
    fingerprint = found.pop()
    return fingerprint if isinstance(fingerprint, str) and fingerprint else None


def cached_price(unit_price: int, fraction: Decimal) -> int:
    """A cached image's millicredits: `fraction` of the rendered price, rounded up."""
    return int((unit_price * fraction).to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class CachedImage:
    """A retained, rendered image whose bytes answer a cache key."""

    cache_key: str
    storage_key: str
    content_type: str
    size_bytes: int
    seed: int
    generation: dict[str, Any] | None


def find_cached_images(
    session: Session, keys: Sequence[str], tenant_id: int | None, now: datetime | None = None
) -> dict[str, CachedImage]:
    """Retained images carrying these keys (one per key), seen by `tenant_id` (None: any).

    One statement on ix_job_images_cache_key, joined to each row's job for its tenant
    and retention.
    """
    if not keys:
        return {}
    now = now or database_now(session)
    query = (
        select(
            JobImage.cache_key,
            JobImage.storage_key,
            JobImage.content_type,
            JobImage.size_bytes,
            JobImage.seed,
            JobImage.generation,
        )
        .join(Job, Job.id == JobImage.job_id)
        .where(
            JobImage.cache_key.in_(list(keys)),
            Job.results_deleted_at.is_(None),
            or_(Job.expires_at.is_(None), Job.expires_at > now),
        )
    )
    if tenant_id is not None:
        # `+ 0` keeps the tenant's indexes out of the plan: without statistics SQLite
        # would walk every job of the tenant; the keys are the selective side.
        query = query.where(Job.tenant_id + 0 == tenant_id)
    found: dict[str, CachedImage] = {}
    for row in session.execute(query):
        found.setdefault(
            row.cache_key,
            CachedImage(
                cache_key=row.cache_key,
                storage_key=row.storage_key,
                content_type=row.content_type,
                size_bytes=row.size_bytes,
                seed=row.seed,
                generation=row.generation,
            ),
        )
    return found


@dataclass(frozen=True)
class CacheHit:
    """A request answered from the cache: its job id, and its images copied under its keys."""

    job_id: str
    images: list[CachedImage]
    storage_keys: list[str]
    price_fraction: Decimal


def copy_cached_images(
    storage: ResultStorage,
    job_id: str,
    images: Sequence[CachedImage],
    destinations: Sequence[str],
    price_fraction: Decimal,
) -> CacheHit:
    """Copy each cached image to the new job's key, so each job's retention is its own.

    ObjectMissing if a source is gone (cleanup ran meanwhile): the caller renders instead.
    """
    copied: list[str] = []
    try:
        for image, key in zip(images, destinations, strict=True):
            storage.copy(image.storage_key, key)
            copied.append(key)
    except BaseException:
        discard_copies(storage, copied)
        raise
    return CacheHit(job_id, list(images), copied, price_fraction)


@contextmanager
def discarded_on_error(storage: ResultStorage, hit: CacheHit | None) -> Iterator[None]:
    """Delete a hit's copies if the block fails (its job was never committed)."""
    try:
        yield
    except BaseException:
        if hit is not None:
            discard_copies(storage, hit.storage_keys)
        raise


def discard_copies(storage: ResultStorage, keys: Sequence[str]) -> None:
    """Delete copies whose job was never committed (best effort)."""
    for key in keys:
        try:
            storage.delete(key)
        except Exception as exc:
            # An orphan object is harmless; the refusal the caller is raising matters more.
            log.warning("cached copy %s not discarded (%s)", key, type(exc).__name__)
