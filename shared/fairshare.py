"""The fair-share policy: which queued job the farm renders next.

Weighted fair queuing in two levels. Across tenants, the k-th next job of a
tenant that already has `a` jobs in flight gets the virtual time
(a + k) / weight; the smallest virtual time goes first. Within a tenant the
same rule orders its users' jobs, and each user's own jobs stay first in,
first out. Ties go to the older job. So a user with 500 queued jobs and a user
with one alternate, and the one job waits for at most about one render per
busy worker.

Pure functions over plain values: the dispatcher, the queue position and the
tests all call the same code.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction


@dataclass(frozen=True)
class QueuedJob:
    """A job waiting for release, with what the policy and the ETA need."""

    job_id: str
    tenant_id: int
    user_id: int
    created_at: datetime
    # Work: pixels x steps x images, in units of one 1024x1024 image at one step.
    work: float = 0.0


@dataclass(frozen=True)
class ShareState:
    """Jobs already in flight (released or running) and the weights, by tenant and user."""

    tenant_active: Mapping[int, int] = field(default_factory=dict)
    user_active: Mapping[int, int] = field(default_factory=dict)
    tenant_weight: Mapping[int, int] = field(default_factory=dict)
    user_weight: Mapping[int, int] = field(default_factory=dict)


def _weighted_merge(
    groups: Mapping[int, list[QueuedJob]], active: Mapping[int, int], weight: Mapping[int, int]
) -> list[QueuedJob]:
    """Interleave ordered groups by virtual time (active + k) / weight, oldest first on ties."""
    keyed = [
        (Fraction(active.get(group, 0) + k, max(1, weight.get(group, 1))), job.created_at, job)
        for group, jobs in groups.items()
        for k, job in enumerate(jobs, start=1)
    ]
    keyed.sort(key=lambda item: (item[0], item[1], item[2].job_id))
    return [job for _, _, job in keyed]


def fair_order(jobs: Iterable[QueuedJob], state: ShareState) -> list[QueuedJob]:
    """Every queued job, in the order the dispatcher releases them."""
    by_tenant_user: dict[int, dict[int, list[QueuedJob]]] = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        by_tenant_user[job.tenant_id][job.user_id].append(job)
    per_tenant: dict[int, list[QueuedJob]] = {}
    for tenant_id, by_user in by_tenant_user.items():
        for user_jobs in by_user.values():
            user_jobs.sort(key=lambda job: (job.created_at, job.job_id))
        per_tenant[tenant_id] = _weighted_merge(by_user, state.user_active, state.user_weight)
    return _weighted_merge(per_tenant, state.tenant_active, state.tenant_weight)


def pick_for_release(
    order: Iterable[QueuedJob], slots: int, state: ShareState, max_running_per_user: int
) -> list[QueuedJob]:
    """The first `slots` jobs of `order` whose user is under the in-flight cap (0: no cap)."""
    in_flight = dict(state.user_active)
    picked: list[QueuedJob] = []
    for job in order:
        if len(picked) >= slots:
            break
        if max_running_per_user and in_flight.get(job.user_id, 0) >= max_running_per_user:
            continue
        in_flight[job.user_id] = in_flight.get(job.user_id, 0) + 1
        picked.append(job)
    return picked
