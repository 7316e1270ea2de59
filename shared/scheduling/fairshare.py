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

import heapq
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
    # Its number in its user's line (the database keeps a user's waiting jobs consecutive).
    seq: int = 0


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


# ---------------------------------------------------------------------------
# The same policy computed from each user's line instead of every queued job.
#
# A user's k-th waiting job has the virtual time (in_flight + k) / weight, so
# the policy needs of each active user only its counts, weights and its first
# and last waiting job; the jobs behind the first are fetched only when the
# order actually reaches them. `FairMerge` yields exactly `fair_order`'s
# sequence and `jobs_ahead` counts exactly the jobs `fair_order` puts before a
# given job; the property tests check both against `fair_order`.

JobKey = tuple[datetime, str]  # (created_at, job_id): how ties are broken


def job_key(job: QueuedJob) -> JobKey:
    """The tie-break of a job: older first, then the smaller id."""
    return (job.created_at, job.job_id)


@dataclass(frozen=True)
class UserLine:
    """One user's line: weights, jobs waiting and in flight, its first and last waiting job."""

    user_id: int
    tenant_id: int
    weight: int = 1
    tenant_weight: int = 1
    waiting: int = 0
    in_flight: int = 0
    waiting_work: float = 0.0
    head: QueuedJob | None = None
    tail: QueuedJob | None = None
    head_seq: int = 0

    @property
    def mean_work(self) -> float:
        """The mean work of the waiting jobs."""
        return self.waiting_work / self.waiting if self.waiting else 0.0


# The user's waiting jobs after `after`, first in first out, at most `limit` of them.
FetchNext = Callable[[UserLine, QueuedJob, int], Sequence[QueuedJob]]


def share_state(lines: Iterable[UserLine]) -> ShareState:
    """What is in flight per tenant and user, and the weights, as `fair_order` takes them."""
    tenant_active: Counter[int] = Counter()
    user_active: dict[int, int] = {}
    tenant_weight: dict[int, int] = {}
    user_weight: dict[int, int] = {}
    for line in lines:
        tenant_active[line.tenant_id] += line.in_flight
        user_active[line.user_id] = line.in_flight
        tenant_weight[line.tenant_id] = line.tenant_weight
        user_weight[line.user_id] = line.weight
    return ShareState(dict(tenant_active), user_active, tenant_weight, user_weight)


class _Cursor:
    """A merge's position in one user's line; fetches the jobs behind the head on demand."""

    def __init__(self, line: UserLine, fetch_next: FetchNext, batch: int) -> None:
        self.line = line
        self.taken = 0
        self._buffer: deque[QueuedJob] = deque([line.head] if line.head else [])
        self._last: QueuedJob | None = None
        self._fetch_next = fetch_next
        self._batch = batch

    def peek(self) -> QueuedJob | None:
        if self.taken >= self.line.waiting:
            return None
        if not self._buffer and self._last is not None:
            self._buffer.extend(self._fetch_next(self.line, self._last, self._batch))
        return self._buffer[0] if self._buffer else None

    def pop(self) -> QueuedJob:
        job = self._buffer.popleft()
        self._last = job
        self.taken += 1
        return job

    def key(self) -> tuple[Fraction, datetime, str, int] | None:
        """Heap key of the next job: its virtual time in the tenant, then its age."""
        job = self.peek()
        if job is None:
            return None
        vt = Fraction(self.line.in_flight + self.taken + 1, max(1, self.line.weight))
        return (vt, job.created_at, job.job_id, self.line.user_id)


class FairMerge:
    """The waiting jobs in `fair_order`'s order, produced lazily from the users' lines."""

    def __init__(self, lines: Iterable[UserLine], fetch_next: FetchNext, batch: int = 16) -> None:
        by_tenant: dict[int, list[UserLine]] = defaultdict(list)
        for line in lines:
            by_tenant[line.tenant_id].append(line)
        self._cursors: dict[int, _Cursor] = {}
        self._tenant_heaps: dict[int, list[tuple[Fraction, datetime, str, int]]] = {}
        self._tenant_base: dict[int, tuple[int, int]] = {}  # in flight, weight
        self._tenant_taken: Counter[int] = Counter()
        self._heap: list[tuple[Fraction, datetime, str, int]] = []
        for tenant_id, tenant_lines in by_tenant.items():
            heap = []
            for line in tenant_lines:
                cursor = _Cursor(line, fetch_next, batch)
                self._cursors[line.user_id] = cursor
                if (key := cursor.key()) is not None:
                    heap.append(key)
            heapq.heapify(heap)
            self._tenant_heaps[tenant_id] = heap
            self._tenant_base[tenant_id] = (
                sum(line.in_flight for line in tenant_lines),
                max(1, tenant_lines[0].tenant_weight),
            )
            self._push_tenant(tenant_id)

    def _push_tenant(self, tenant_id: int) -> None:
        heap = self._tenant_heaps[tenant_id]
        if heap:
            active, weight = self._tenant_base[tenant_id]
            vt = Fraction(active + self._tenant_taken[tenant_id] + 1, weight)
            _, created_at, job_id, _ = heap[0]
            heapq.heappush(self._heap, (vt, created_at, job_id, tenant_id))

    def __iter__(self) -> Iterator[QueuedJob]:
        return self

    def __next__(self) -> QueuedJob:
        if not self._heap:
            raise StopIteration
        _, _, _, tenant_id = heapq.heappop(self._heap)
        heap = self._tenant_heaps[tenant_id]
        _, _, _, user_id = heapq.heappop(heap)
        cursor = self._cursors[user_id]
        job = cursor.pop()
        if (key := cursor.key()) is not None:
            heapq.heappush(heap, key)
        self._tenant_taken[tenant_id] += 1
        self._push_tenant(tenant_id)
        return job


# Keys of the k-th waiting job of each (line, k) asked; a missing entry means unknown.
ResolveKeys = Callable[[list[tuple[UserLine, int]]], Mapping[tuple[int, int], JobKey]]


@dataclass(frozen=True)
class Ahead:
    """The waiting jobs the fair order puts before a job, and their work.

    `uncertain` counts equal-virtual-time ties whose tie-break could not be read
    (a key `resolve` did not return); each was counted as ahead, so `jobs` is then
    an upper bound. It is 0, and `jobs` exact, whenever `resolve` answers every
    key asked, as the database's does. `work` adds each line's mean job work for
    the jobs counted from it, so it is exact when a line's jobs are alike.
    """

    jobs: int
    work: float
    uncertain: int = 0


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _count_before(
    numerator: int, denominator: int, weight: int, active: int, size: int
) -> tuple[int, int | None]:
    """How many of k = 1..size come before numerator/denominator, and the k that ties.

    The k-th item of the sequence has the virtual time (active + k) / weight.
    """
    scaled = numerator * weight - active * denominator
    strict = min(size, max(0, _ceil_div(scaled, denominator) - 1))
    tie = scaled // denominator if scaled % denominator == 0 else None
    return strict, tie if tie is not None and 1 <= tie <= size else None


def _known_key(line: UserLine, k: int, target: JobKey) -> JobKey | bool | None:
    """The k-th waiting job's key, or whether it is older than `target`, from the line's ends.

    None when only reading the line can tell.
    """
    assert line.head is not None and line.tail is not None
    if k == 1:
        return job_key(line.head)
    if k == line.waiting:
        return job_key(line.tail)
    if job_key(line.tail) < target:
        return True  # every waiting job of the line is older
    if job_key(line.head) > target:
        return False  # every one is younger
    return None


@dataclass
class _TenantTie:
    """A tenant whose r-th job ties with the target; which of its jobs that is."""

    jobs: list[tuple[UserLine, int]]  # the jobs at the tied virtual time
    index: int  # the tied job's place among them, by age (0-based)
    mean_work: float
    keys: dict[tuple[int, int], JobKey | bool | None] = field(default_factory=dict)


def _kth_virtual_time(lines: list[UserLine], rank: int) -> tuple[int, int]:
    """The virtual time (numerator, denominator) of the rank-th job of a tenant's merged lines."""
    top = max(max(1, line.weight) for line in lines)
    # Distinct virtual times differ by more than 1/top^2: on a grid finer than that,
    # the smallest grid point with `rank` jobs at or below it brackets exactly one.
    scale = 1 << (2 * top.bit_length() + 2)

    def count_at_most(point: int) -> int:  # jobs with virtual time <= point / scale
        return sum(
            min(line.waiting, max(0, (point * max(1, line.weight)) // scale - line.in_flight))
            for line in lines
        )

    low, high = (
        0,
        max(
            _ceil_div((line.in_flight + line.waiting) * scale, max(1, line.weight))
            for line in lines
        ),
    )
    while low < high:
        mid = (low + high) // 2
        if count_at_most(mid) >= rank:
            high = mid
        else:
            low = mid + 1
    # The largest virtual time at or below the grid point is the one bracketed.
    best: tuple[int, int] | None = None
    for line in lines:
        weight = max(1, line.weight)
        k = min(line.waiting, (low * weight) // scale - line.in_flight)
        if k >= 1 and (best is None or (line.in_flight + k) * best[1] > best[0] * weight):
            best = (line.in_flight + k, weight)
    assert best is not None
    return best


def _tenant_tie(lines: list[UserLine], rank: int, target: JobKey) -> _TenantTie | bool:
    """The tenant's rank-th job, or directly whether it is older than `target`."""
    waiting = [line for line in lines if line.waiting > 0]
    total = sum(line.waiting for line in waiting)
    if rank == 1:
        first = min(
            waiting,
            key=lambda line: (
                Fraction(line.in_flight + 1, max(1, line.weight)),
                job_key(line.head),  # type: ignore[arg-type]
            ),
        )
        return job_key(first.head) < target  # type: ignore[arg-type]
    if rank == total:
        last = max(
            waiting,
            key=lambda line: (
                Fraction(line.in_flight + line.waiting, max(1, line.weight)),
                job_key(line.tail),  # type: ignore[arg-type]
            ),
        )
        return job_key(last.tail) < target  # type: ignore[arg-type]
    if all(job_key(line.tail) < target for line in waiting):  # type: ignore[arg-type]
        return True
    if all(job_key(line.head) > target for line in waiting):  # type: ignore[arg-type]
        return False
    numerator, denominator = _kth_virtual_time(waiting, rank)
    before = 0
    tied: list[tuple[UserLine, int]] = []
    for line in waiting:
        strict, tie = _count_before(
            numerator, denominator, max(1, line.weight), line.in_flight, line.waiting
        )
        before += strict
        if tie is not None:
            tied.append((line, tie))
    mean_work = sum(line.waiting_work for line in waiting) / total
    found = _TenantTie(tied, rank - before - 1, mean_work)
    for line, k in tied:
        found.keys[(line.user_id, k)] = _known_key(line, k, target)
    return found


def _tie_is_ahead(
    tie: _TenantTie, target: JobKey, resolved: Mapping[tuple[int, int], JobKey]
) -> bool | None:
    """Whether the tied job is older than `target`; None if an age stayed unknown.

    The tied jobs sort by age, so the index-th one is older than the target exactly
    when more than `index` of them are.
    """
    older = 0
    for line, k in tie.jobs:
        known = tie.keys.get((line.user_id, k))
        if known is None:
            known = resolved.get((line.user_id, k))
        if known is None:
            return None
        older += known is True or (known is not False and known < target)
    return tie.index < older


def ahead_in_tenant(
    tenant_lines: Sequence[UserLine], job: QueuedJob, rank: int, resolve: ResolveKeys
) -> Ahead:
    """The waiting jobs of `job`'s own tenant that come before it (it is its user's rank-th).

    `tenant_lines` holds every line of the tenant with jobs waiting or in flight.
    """
    target = job_key(job)
    own = next(line for line in tenant_lines if line.user_id == job.user_id)
    numerator, denominator = own.in_flight + rank, max(1, own.weight)
    count, work, uncertain = rank - 1, (rank - 1) * own.mean_work, 0
    pending: list[tuple[UserLine, int]] = []
    for line in tenant_lines:
        if line is own or line.waiting == 0:
            continue
        strict, tie = _count_before(
            numerator, denominator, max(1, line.weight), line.in_flight, line.waiting
        )
        count += strict
        work += strict * line.mean_work
        if tie is None:
            continue
        known = _known_key(line, tie, target)
        if known is None:
            pending.append((line, tie))
        elif known is True or (known is not False and known < target):
            count += 1
            work += line.mean_work
    resolved = resolve(pending) if pending else {}
    for line, k in pending:
        key = resolved.get((line.user_id, k))
        if key is None or key < target:
            count += 1
            work += line.mean_work
            uncertain += key is None
    return Ahead(count, work, uncertain)


def tenant_virtual_time(tenant_lines: Sequence[UserLine], jobs_before: int) -> tuple[int, int]:
    """The tenant-level virtual time (numerator, denominator) of its job after `jobs_before`."""
    active = sum(line.in_flight for line in tenant_lines)
    return active + jobs_before + 1, max(1, tenant_lines[0].tenant_weight)


def tenant_counts(
    group: Sequence[UserLine], numerator: int, denominator: int
) -> tuple[int, int | None, float]:
    """How many of a tenant's waiting jobs precede a tenant-level virtual time, and which ties.

    Also returns their mean work.
    """
    size = sum(line.waiting for line in group)
    if size == 0:
        return 0, None, 0.0
    mean = sum(line.waiting_work for line in group) / size
    strict, tie = _count_before(
        numerator,
        denominator,
        max(1, group[0].tenant_weight),
        sum(line.in_flight for line in group),
        size,
    )
    return strict, tie, mean


def tied_jobs_ahead(
    ties: Sequence[tuple[Sequence[UserLine], int]], job: QueuedJob, resolve: ResolveKeys
) -> Ahead:
    """Of tenants whose rank-th job ties with `job` in virtual time: how many tied jobs are older.

    Each entry is a tenant's lines and the tied rank; the tenant's mean work counts per job.
    """
    target = job_key(job)
    count, work, uncertain = 0, 0.0, 0
    tenant_ties: list[_TenantTie] = []
    for group, rank in ties:
        found = _tenant_tie(list(group), rank, target)
        if found is True:
            count += 1
            work += sum(line.waiting_work for line in group) / sum(line.waiting for line in group)
        elif isinstance(found, _TenantTie):
            tenant_ties.append(found)
    asked = [
        (line, k)
        for found in tenant_ties
        for line, k in found.jobs
        if found.keys[(line.user_id, k)] is None
    ]
    resolved = resolve(asked) if asked else {}
    for found in tenant_ties:
        ahead = _tie_is_ahead(found, target, resolved)
        if ahead is None or ahead:
            count += 1
            work += found.mean_work
            uncertain += ahead is None
    return Ahead(count, work, uncertain)


def jobs_ahead(lines: Sequence[UserLine], job: QueuedJob, rank: int, resolve: ResolveKeys) -> Ahead:
    """The waiting jobs that come before `job`, the `rank`-th waiting job of its user.

    `lines` holds every user with jobs waiting or in flight. Ties in virtual time
    are broken by age, which needs the key of the tied job: the line's ends give
    it, or tell whether it is older; otherwise `resolve` reads it (at most two
    calls, each with every key still needed). The database computes the same sum
    across tenants in SQL (see `shared.scheduling.positions.queue_place`).
    """
    own_tenant = next(line.tenant_id for line in lines if line.user_id == job.user_id)
    tenant_lines = [line for line in lines if line.tenant_id == own_tenant]
    inside = ahead_in_tenant(tenant_lines, job, rank, resolve)
    numerator, denominator = tenant_virtual_time(tenant_lines, inside.jobs)
    others: dict[int, list[UserLine]] = defaultdict(list)
    for line in lines:
        if line.tenant_id != own_tenant:
            others[line.tenant_id].append(line)
    count, work = inside.jobs, inside.work
    ties: list[tuple[Sequence[UserLine], int]] = []
    for group in others.values():
        strict, tie, mean = tenant_counts(group, numerator, denominator)
        count += strict
        work += strict * mean
        if tie is not None:
            ties.append((group, tie))
    tied = tied_jobs_ahead(ties, job, resolve)
    return Ahead(count + tied.jobs, work + tied.work, inside.uncertain + tied.uncertain)
