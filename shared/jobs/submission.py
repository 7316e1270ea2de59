"""A submission, end to end: idempotency claim, result cache, the job and its hold.

The API's two submit routes call `submit_request` and only translate HTTP into a
`SubmitRequest` and the `Submission` back into an answer. It spans a few short
transactions (never one held across storage calls): the idempotency claim in its
own, a read-only cache lookup, then the job with its hold. What happens after the
job's commit (counting it, waking the dispatcher, announcing a cache hit's end)
is the transition's after-commit effects (`shared.jobs.effects`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import redis

from shared.accounts.ledger import get_balance
from shared.accounts.users import Principal
from shared.clock import database_now
from shared.db import read_only, transaction
from shared.jobs.cache import (
    CacheHit,
    copy_cached_images,
    discarded_on_error,
    find_cached_images,
    fleet_fingerprint,
    image_cache_keys,
)
from shared.jobs.idempotency import (
    Claimed,
    Replay,
    attach_job,
    claim_key,
    release_claim,
    submission_fingerprint,
)
from shared.jobs.params import RANDOM_SEED, KolorsParams
from shared.jobs.queries import get_job
from shared.jobs.transitions import image_storage_key, new_job_id, submit_job
from shared.models import Job
from shared.resources import Resources
from shared.scheduling.fleet import live_workers
from shared.webhooks.urls import check_webhook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmitRequest:
    """What a caller asks: parameters, route, deadline, retention, an optional idempotency key."""

    principal: Principal
    route: str
    params: KolorsParams
    retention: timedelta
    deadline: timedelta | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Submission:
    """The request a submission created (or, replayed, found) and the caller's balance after."""

    job: Job
    balance: int
    replayed: bool = False


def submit_request(resources: Resources, asked: SubmitRequest) -> Submission:
    """Submit, or with an idempotency key seen before, find the request it created."""
    check_webhook(asked.params.webhook, resources.settings)  # before anything is written
    if asked.idempotency_key is None:
        return _submit(resources, asked, None)
    digest = submission_fingerprint(
        asked.route,
        asked.params,
        asked.deadline.total_seconds() if asked.deadline else None,
        asked.retention.total_seconds(),
    )
    ttl = timedelta(seconds=resources.settings.idempotency_ttl_s)
    user_id = asked.principal.user_id
    with transaction(resources.sessions) as session:
        claim = claim_key(
            session, user_id, asked.idempotency_key, digest, database_now(session), ttl
        )
    if isinstance(claim, Replay):
        with read_only(resources.sessions) as session:
            job = get_job(session, asked.principal, claim.job_id)
            balance = get_balance(session, user_id)
        return Submission(job, balance, replayed=True)
    try:
        return _submit(resources, asked, claim)
    except Exception:
        try:
            with transaction(resources.sessions) as session:
                release_claim(session, claim)
        except Exception as exc:
            # Taken over once stale (a minute), so a retry succeeds even so.
            log.warning("idempotency claim not released (%s)", type(exc).__name__)
        raise


def _submit(resources: Resources, asked: SubmitRequest, claimed: Claimed | None) -> Submission:
    """Commit the job with its hold (COMPLETED at once when the result cache has it)."""
    settings = resources.settings
    hit = _cache_hit(resources, asked)
    with discarded_on_error(resources.storage, hit), transaction(resources.sessions) as session:
        job = submit_job(
            session,
            asked.principal,
            asked.params,
            settings.price_per_image,
            max_live_jobs=settings.max_queued_per_user,
            deadline=asked.deadline,
            retention=asked.retention,
            cached=hit,
        )
        if claimed is not None:
            attach_job(session, claimed, job.id)
        balance = get_balance(session, asked.principal.user_id)
    if hit is not None:
        log.info("job %s answered from the result cache", job.id)
    else:
        log.info("job %s queued for user %s", job.id, asked.principal.user_id)
    return Submission(job, balance)


def _cache_hit(resources: Resources, asked: SubmitRequest) -> CacheHit | None:
    """The request's images copied from the result cache for a new job; None: render it.

    Only while every live worker names one render fingerprint, for a fixed seed, and
    when every image hits; a miss costs one indexed read.
    """
    settings, params = resources.settings, asked.params
    if not settings.cache or params.seed == RANDOM_SEED:
        return None  # a random seed practically never repeats: no lookup at all
    try:
        fingerprint = fleet_fingerprint(live_workers(resources.redis))
    except redis.RedisError:
        return None
    if fingerprint is None:
        return None
    keys = image_cache_keys(params, params.seed, fingerprint)
    tenant = asked.principal.tenant_id if settings.cache_scope == "tenant" else None
    with read_only(resources.sessions) as session:
        found = find_cached_images(session, keys, tenant)
    if len(found) < len(keys):
        return None
    job_id = new_job_id()
    destinations = [
        image_storage_key(asked.principal.tenant_id, job_id, index, params.output_format)
        for index in range(len(keys))
    ]
    try:
        return copy_cached_images(
            resources.storage,
            job_id,
            [found[key] for key in keys],
            destinations,
            settings.cache_price_fraction,
        )
    except Exception as exc:
        # A source deleted meanwhile (retention cleanup), or storage trouble: render it.
        log.warning("result cache copy failed (%s); rendering instead", type(exc).__name__)
        return None
