"""Idempotency keys for submissions (the IETF `Idempotency-Key` HTTP header field draft).

A client that sends `Idempotency-Key: K` may send the same submission again (a
timeout, a dropped connection, a crash) and get the same request back instead of
a second render and a second hold. Keys are scoped per user and kept in SQL
(`idempotency_keys`) until they expire.

A submission with a key takes two short transactions:

1. `claim_key` records the key with no job yet (job_id NULL). The unique
   (user_id, key) constraint arbitrates concurrent duplicates on SQLite and
   PostgreSQL alike: exactly one claims it. The others find the row and get the
   request it names (`Replay`), a 409 while it is still being created
   (`KeyInProgress`), or a 422 when their body differs (`KeyReused`).
2. `attach_job`, in the submission's own transaction, sets the claim's job. A
   submission that fails (not enough credits, too many jobs, the database) gives
   the claim back with `release_claim`, so a retry can succeed.

A claim left without a job by a crash between the two is taken over by the next
request with the key once it is `STALE_CLAIM_AFTER` old; the crashed request, if
it was only slow, then finds its claim gone and answers 409 without creating
anything (its job and hold roll back with `attach_job`'s failure).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.errors import FarmError, FieldProblem, InvalidParams
from shared.jobs.params import KolorsParams
from shared.models import IdempotencyKey

HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
MAX_KEY_LENGTH: Final = 255
# Visible ASCII: what a header carries unchanged through every proxy and client library.
_VISIBLE = frozenset(chr(code) for code in range(0x21, 0x7F))
# A claim still without a job after this long was left by a crashed request.
STALE_CLAIM_AFTER: Final = timedelta(seconds=60)
IN_PROGRESS_RETRY_AFTER_S: Final = 1
# Expired keys deleted per periodic cleanup: bounded, so one cleanup is one short transaction.
IDEMPOTENCY_CLEANUP_BATCH: Final = 1000
# Unique-constraint races are settled in one more read; a few rounds bound the pathological case.
_CLAIM_ROUNDS: Final = 3


class KeyInProgress(FarmError):
    """The key's first request is still being created: retry shortly."""

    status = 409
    title = "Request in progress"

    def __init__(self) -> None:
        super().__init__(
            f"A request with this {HEADER} is still being created; retry shortly to get its answer"
        )
        self.retry_after_s = IN_PROGRESS_RETRY_AFTER_S


class KeyReused(InvalidParams):
    """The key was first used with another request (route or parameters)."""

    status = 422
    title = "Idempotency key reused"

    def __init__(self) -> None:
        super().__init__(
            [
                FieldProblem(
                    field=HEADER,
                    rule="idempotency_key_reused",
                    message="was first used with another request (route or parameters); "
                    "a new request needs a new key",
                )
            ]
        )


@dataclass(frozen=True)
class Claimed:
    """The key is ours: create the job and `attach_job` it."""

    claim_id: int


@dataclass(frozen=True)
class Replay:
    """The key's request exists: answer it again."""

    job_id: str


def check_key(values: Sequence[str]) -> str | None:
    """The request's key (None without the header); a 400 naming the header if it is bad."""
    if not values:
        return None
    if len(values) > 1:
        raise InvalidParams.single(HEADER, "single_value", "must be sent once")
    key = values[0]
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not set(key) <= _VISIBLE:
        raise InvalidParams.single(
            HEADER,
            "visible_ascii_1_to_255",
            f"must be 1 to {MAX_KEY_LENGTH} visible ASCII characters (no spaces)",
        )
    return key


def fingerprint(route: str, parameters: Mapping[str, Any]) -> str:
    """SHA-256 hex of a route and its parsed parameters, in one canonical JSON form.

    `parameters` are the values the farm parsed (defaults filled in, numbers as
    numbers), so JSON and form encodings of one request, in any key order, agree.
    """
    canonical = json.dumps(
        {"route": route, "parameters": parameters},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def submission_fingerprint(
    route: str, params: KolorsParams, deadline_s: float | None, retention_s: float
) -> str:
    """The fingerprint of a submission: its route, parameters, deadline and retention.

    Every parameter counts as parsed, but `base64`, which shapes only the answer.
    """
    return fingerprint(
        route,
        {
            "parameters": params.model_dump(mode="json", exclude={"base64"}),
            "deadline_s": deadline_s,
            "retention_s": retention_s,
        },
    )


def claim_key(
    session: Session, user_id: int, key: str, digest: str, now: datetime, ttl: timedelta
) -> Claimed | Replay:
    """Claim `key` for a new request, or find the request it already names.

    Raises KeyReused (another body) or KeyInProgress (no job yet). An expired key
    is replaced as if new, and a claim older than `STALE_CLAIM_AFTER` without a
    job is taken over.
    """
    for _ in range(_CLAIM_ROUNDS):
        row = session.execute(
            select(IdempotencyKey).where(
                IdempotencyKey.user_id == user_id, IdempotencyKey.key == key
            )
        ).scalar_one_or_none()
        if row is not None:
            if row.expires_at <= now:
                _forget(session, row, IdempotencyKey.expires_at <= now)
            elif row.job_id is None and row.created_at <= now - STALE_CLAIM_AFTER:
                _forget(session, row, IdempotencyKey.job_id.is_(None))
            elif row.fingerprint != digest:
                raise KeyReused()
            elif row.job_id is None:
                raise KeyInProgress()
            else:
                return Replay(row.job_id)
        claim = IdempotencyKey(
            user_id=user_id, key=key, fingerprint=digest, created_at=now, expires_at=now + ttl
        )
        try:
            # A savepoint: a lost race aborts only the INSERT, not the transaction (PostgreSQL).
            with session.begin_nested():
                session.add(claim)
                session.flush()
        except IntegrityError:
            continue  # another request claimed it first: read what it claimed
        return Claimed(claim.id)
    raise KeyInProgress()


def _forget(session: Session, row: IdempotencyKey, condition: Any) -> None:
    """Delete an expired or abandoned claim (if `condition` still holds), to claim anew."""
    session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.id == row.id, condition),
        execution_options={"synchronize_session": False},
    )
    session.expunge(row)


def attach_job(session: Session, claimed: Claimed, job_id: str) -> None:
    """Name the claim's job, in the submission's transaction; KeyInProgress if it was taken over."""
    done = session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.id == claimed.claim_id, IdempotencyKey.job_id.is_(None))
        .values(job_id=job_id),
        execution_options={"synchronize_session": False},
    )
    if getattr(done, "rowcount", 0) != 1:
        # Taken over as stale: the other request creates the job; this one must not.
        raise KeyInProgress()


def release_claim(session: Session, claimed: Claimed) -> None:
    """Give a claim back after its request failed to create a job, so a retry can."""
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.id == claimed.claim_id, IdempotencyKey.job_id.is_(None)
        ),
        execution_options={"synchronize_session": False},
    )


def delete_expired_keys(
    session: Session, now: datetime, batch: int = IDEMPOTENCY_CLEANUP_BATCH
) -> int:
    """Delete up to `batch` keys past their expiry (oldest first, by the expiry index)."""
    ids = list(
        session.execute(
            select(IdempotencyKey.id)
            .where(IdempotencyKey.expires_at <= now)
            .order_by(IdempotencyKey.expires_at)
            .limit(batch)
        ).scalars()
    )
    if not ids:
        return 0
    session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.id.in_(ids), IdempotencyKey.expires_at <= now),
        execution_options={"synchronize_session": False},
    )
    return len(ids)
