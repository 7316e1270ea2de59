"""What a scrape reads live: queue depth and oldest wait per tenant, workers' gauges, the leader.

Queues come from the tenants' queue rows (`tenant_queues`, only tenants with work,
found by an index), workers from their heartbeats: a scrape's cost grows with tenants
and workers, never with jobs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from shared.models import ACTIVE_LINE, Tenant, TenantQueue, UserQueue
from shared.scheduling.fleet import DISPATCH_LOCK_KEY, fleet


@dataclass(frozen=True)
class TenantLoad:
    """A tenant with work: jobs waiting, jobs in flight, when its oldest waiting job came."""

    tenant: str
    waiting: int
    in_flight: int
    oldest_created_at: datetime | None

    def oldest_age_s(self, now: datetime) -> float:
        """Seconds the oldest waiting job has waited (0 when none waits)."""
        if not self.waiting or self.oldest_created_at is None:
            return 0.0
        return max(0.0, (now - self.oldest_created_at).total_seconds())


def active_tenants_query() -> Select[str, int, int, datetime | None]:
    """The queues of the tenants with work, found through the active users' lines' index.

    Reads one index entry per active user and one row per active tenant; no job.
    """
    # The partial index ix_user_queues_active holds exactly the lines with work.
    active = select(UserQueue.tenant_id).where(ACTIVE_LINE).distinct().scalar_subquery()
    return (
        select(
            Tenant.name,
            TenantQueue.waiting,
            TenantQueue.in_flight,
            TenantQueue.oldest_created_at,
        )
        .join(Tenant, Tenant.id == TenantQueue.tenant_id)
        .where(TenantQueue.tenant_id.in_(active))
        .order_by(Tenant.name)
    )


def active_tenants(session: Session) -> list[TenantLoad]:
    """The tenants with jobs waiting or in flight, and their queues."""
    return [
        TenantLoad(row.name, row.waiting, row.in_flight, row.oldest_created_at)
        for row in session.execute(active_tenants_query())
        if row.waiting or row.in_flight
    ]


def tenant_names(session: Session, tenant_ids: Iterable[int]) -> dict[int, str]:
    """Tenant names by id (for the tenants the counters name)."""
    wanted = sorted(set(tenant_ids))
    if not wanted:
        return {}
    rows = session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(wanted)))
    return {row.id: row.name for row in rows}


@dataclass(frozen=True)
class WorkerGauge:
    """What a live worker's last heartbeat said, as numbers."""

    name: str
    device: str
    busy_fraction: float | None
    memory_total_bytes: float | None
    memory_used_bytes: float | None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def dispatcher_active(client: redis.Redis) -> bool:
    """Whether a dispatcher holds the leader lock."""
    return bool(client.exists(DISPATCH_LOCK_KEY))


def worker_gauges(client: redis.Redis) -> list[WorkerGauge]:
    """The live workers, from their heartbeats (one round trip)."""
    workers, _speeds = fleet(client)
    gauges = []
    for name, info in sorted(workers.items()):
        total = _number(info.get("memory_total_bytes"))
        free = _number(info.get("memory_free_bytes"))
        used = total - free if total is not None and free is not None else None
        gauges.append(
            WorkerGauge(
                name=name,
                device=str(info.get("device", "")),
                busy_fraction=_number(info.get("busy_fraction")),
                memory_total_bytes=total,
                memory_used_bytes=used,
            )
        )
    return gauges
