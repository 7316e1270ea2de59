"""The fair-share policy (shared/scheduling/fairshare.py): pure functions over plain values."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.scheduling.fairshare import (
    FairMerge,
    FetchNext,
    JobKey,
    QueuedJob,
    ResolveKeys,
    ShareState,
    UserLine,
    fair_order,
    job_key,
    jobs_ahead,
    pick_for_release,
    share_state,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)
NOTHING = ShareState()


def job(job_id: str, tenant: int, user: int, second: float) -> QueuedJob:
    """A queued job created `second` seconds after T0."""
    return QueuedJob(
        job_id=job_id, tenant_id=tenant, user_id=user, created_at=T0 + timedelta(seconds=second)
    )


def ids(jobs: list[QueuedJob]) -> list[str]:
    return [j.job_id for j in jobs]


def users(jobs: list[QueuedJob]) -> list[int]:
    return [j.user_id for j in jobs]


def tenants(jobs: list[QueuedJob]) -> list[int]:
    return [j.tenant_id for j in jobs]


# ---------------------------------------------------------------- ordering


def test_empty_queue_gives_empty_order() -> None:
    assert fair_order([], NOTHING) == []


def test_one_users_jobs_stay_fifo() -> None:
    # Given out of order (and with a job id order that disagrees with time).
    jobs = [job(f"z{9 - i}", 1, 1, i) for i in range(10)]
    shuffled = jobs[5:] + jobs[:5][::-1]
    assert ids(fair_order(shuffled, NOTHING)) == ids(jobs)


def test_two_users_with_equal_weights_alternate() -> None:
    a = [job(f"a{i}", 1, 1, i) for i in range(5)]
    b = [job(f"b{i}", 2, 2, 100 + i) for i in range(5)]
    order = fair_order(a + b, NOTHING)
    assert ids(order) == [x for pair in zip(ids(a), ids(b), strict=True) for x in pair]


def test_two_users_of_one_tenant_alternate() -> None:
    a = [job(f"a{i}", 1, 1, i) for i in range(4)]
    b = [job(f"b{i}", 1, 2, 100 + i) for i in range(4)]
    assert users(fair_order(b + a, NOTHING)) == [1, 2, 1, 2, 1, 2, 1, 2]


def test_single_job_after_a_long_backlog_comes_within_one() -> None:
    a = [job(f"a{i:03d}", 1, 1, i) for i in range(200)]
    b = job("b", 2, 2, 1000)
    order = ids(fair_order([*a, b], NOTHING))
    assert order.index("b") <= 1
    # The older job wins the tie: the backlog's first job, then b.
    assert order[:3] == ["a000", "b", "a001"]


def test_single_job_of_same_tenant_after_a_long_backlog_comes_within_one() -> None:
    a = [job(f"a{i:03d}", 1, 1, i) for i in range(200)]
    b = job("b", 1, 2, 1000)
    assert ids(fair_order([*a, b], NOTHING)).index("b") <= 1


def test_single_job_goes_first_when_the_backlog_already_has_jobs_in_flight() -> None:
    a = [job(f"a{i:03d}", 1, 1, i) for i in range(200)]
    b = job("b", 2, 2, 1000)
    state = ShareState(tenant_active={1: 2}, user_active={1: 2})
    assert ids(fair_order([*a, b], state))[0] == "b"
    # Same when both users share one tenant: the user-level count decides.
    b_same = job("b", 1, 2, 1000)
    state_same = ShareState(tenant_active={1: 2}, user_active={1: 2})
    assert ids(fair_order([*a, b_same], state_same))[0] == "b"


def test_tenant_weight_two_gets_twice_the_share_in_every_prefix() -> None:
    heavy = [job(f"h{i:03d}", 1, 1, i) for i in range(90)]
    light = [job(f"l{i:03d}", 2, 2, i) for i in range(90)]
    state = ShareState(tenant_weight={1: 2, 2: 1})
    order = fair_order(light + heavy, state)
    assert len(order) == 180
    counts: Counter[int] = Counter()
    for n, queued in enumerate(order, start=1):
        counts[queued.tenant_id] += 1
        if counts[1] == 90 or counts[2] == 90:
            break  # one ran dry; the rest is whoever is left
        assert abs(counts[1] - 2 * counts[2]) <= 2, (n, counts)
    # Over the first 60 renders the heavy tenant gets 40.
    assert Counter(tenants(order[:60])) == {1: 40, 2: 20}


def test_user_weights_within_a_tenant() -> None:
    heavy = [job(f"h{i:03d}", 7, 1, i) for i in range(60)]
    light = [job(f"l{i:03d}", 7, 2, i) for i in range(60)]
    other_tenant = [job(f"o{i:03d}", 8, 3, i) for i in range(60)]
    state = ShareState(user_weight={1: 3, 2: 1})
    order = fair_order(heavy + light + other_tenant, state)
    # Tenant 7 still gets half of the farm against tenant 8 (weights are per tenant)...
    assert Counter(tenants(order[:40])) == {7: 20, 8: 20}
    # ...and, inside tenant 7, user 1 gets three renders to user 2's one.
    in_tenant = [q.user_id for q in order if q.tenant_id == 7][:40]
    assert Counter(in_tenant) == {1: 30, 2: 10}
    # A user weight counts only inside its own tenant: user 3 (weight 1) is unaffected.
    assert ids([q for q in order if q.user_id == 3]) == ids(other_tenant)


def test_tenant_in_flight_count_shifts_the_order() -> None:
    a = [job(f"a{i}", 1, 1, i) for i in range(3)]
    b = [job(f"b{i}", 2, 2, 10 + i) for i in range(3)]
    state = ShareState(tenant_active={1: 2}, user_active={1: 2})
    # a's k-th job has virtual time 2 + k, b's has k: b1, b2, then a tie at 3 goes to the older a0.
    assert ids(fair_order(a + b, state)) == ["b0", "b1", "a0", "b2", "a1", "a2"]


def test_user_in_flight_count_shifts_the_order_within_a_tenant() -> None:
    a = [job(f"a{i}", 1, 1, i) for i in range(3)]
    b = [job(f"b{i}", 1, 2, 10 + i) for i in range(3)]
    state = ShareState(tenant_active={1: 1}, user_active={1: 1})
    assert ids(fair_order(a + b, state)) == ["b0", "a0", "b1", "a1", "b2", "a2"]


def test_in_flight_counts_for_absent_groups_are_ignored() -> None:
    a = [job(f"a{i}", 1, 1, i) for i in range(3)]
    state = ShareState(tenant_active={9: 50}, user_active={9: 50})
    assert ids(fair_order(a, state)) == ["a0", "a1", "a2"]


def test_ties_go_to_the_older_job() -> None:
    # Equal virtual times; the younger job has the smaller id and tenant id.
    young = job("a-young", 1, 1, 5)
    old = job("z-old", 2, 2, 1)
    assert ids(fair_order([young, old], NOTHING)) == ["z-old", "a-young"]
    # Within one tenant too.
    young_same = job("a-young", 3, 1, 5)
    old_same = job("z-old", 3, 2, 1)
    assert ids(fair_order([young_same, old_same], NOTHING)) == ["z-old", "a-young"]


def test_exact_ties_fall_back_to_job_id() -> None:
    first = job("j1", 2, 2, 0)
    second = job("j2", 1, 1, 0)
    assert ids(fair_order([second, first], NOTHING)) == ["j1", "j2"]
    assert ids(fair_order([first, second], NOTHING)) == ["j1", "j2"]


# ---------------------------------------------------------------- release


def test_pick_respects_slots() -> None:
    order = fair_order([job(f"a{i}", 1, 1, i) for i in range(5)], NOTHING)
    assert ids(pick_for_release(order, 3, NOTHING, 0)) == ["a0", "a1", "a2"]
    assert pick_for_release(order, 0, NOTHING, 0) == []
    assert pick_for_release(order, -1, NOTHING, 0) == []
    assert ids(pick_for_release(order, 99, NOTHING, 0)) == ids(order)


def test_pick_applies_the_per_user_cap() -> None:
    a = [job(f"a{i}", 1, 1, i) for i in range(5)]
    b = [job(f"b{i}", 2, 2, 10 + i) for i in range(5)]
    order = fair_order(a + b, NOTHING)
    picked = pick_for_release(order, 6, NOTHING, 2)
    # Two each, then nothing more of either user although slots remain.
    assert ids(picked) == ["a0", "b0", "a1", "b1"]


def test_pick_counts_jobs_already_in_flight_against_the_cap() -> None:
    a = [job(f"a{i}", 1, 1, i) for i in range(5)]
    b = [job(f"b{i}", 2, 2, 10 + i) for i in range(5)]
    state = ShareState(tenant_active={1: 1}, user_active={1: 1})
    order = fair_order(a + b, state)
    picked = pick_for_release(order, 5, state, 2)
    assert Counter(users(picked)) == {1: 1, 2: 2}
    # At the cap already: none of that user's jobs is picked.
    full = ShareState(tenant_active={1: 2}, user_active={1: 2})
    assert 1 not in users(pick_for_release(fair_order(a + b, full), 5, full, 2))


def test_pick_with_cap_zero_means_no_cap() -> None:
    a = [job(f"a{i}", 1, 1, i) for i in range(5)]
    state = ShareState(tenant_active={1: 100}, user_active={1: 100})
    assert ids(pick_for_release(fair_order(a, state), 5, state, 0)) == ids(a)


def test_pick_keeps_the_order_it_is_given() -> None:
    a = [job(f"a{i}", 1, 1, i) for i in range(3)]
    reversed_order = a[::-1]
    assert ids(pick_for_release(reversed_order, 2, NOTHING, 0)) == ["a2", "a1"]


# ---------------------------------------------------------------- properties

# Each user belongs to exactly one tenant, as in the database.
USERS = 6


@st.composite
def queues(draw: st.DrawFn, max_size: int = 40) -> list[QueuedJob]:
    tenant_of = draw(st.lists(st.integers(0, 3), min_size=USERS, max_size=USERS))
    entries = draw(
        st.lists(st.tuples(st.integers(0, USERS - 1), st.integers(0, 20)), max_size=max_size)
    )
    return [
        QueuedJob(
            job_id=f"j{i:03d}",
            tenant_id=tenant_of[user],
            user_id=user,
            created_at=T0 + timedelta(seconds=second),
        )
        for i, (user, second) in enumerate(entries)
    ]


@st.composite
def share_states(draw: st.DrawFn) -> ShareState:
    counts = st.dictionaries(st.integers(0, USERS - 1), st.integers(0, 5), max_size=USERS)
    weights = st.dictionaries(st.integers(0, USERS - 1), st.integers(1, 4), max_size=USERS)
    return ShareState(
        tenant_active=draw(counts),
        user_active=draw(counts),
        tenant_weight=draw(weights),
        user_weight=draw(weights),
    )


@settings(max_examples=200, deadline=None)
@given(jobs=queues(), state=share_states())
def test_order_is_a_permutation(jobs: list[QueuedJob], state: ShareState) -> None:
    order = fair_order(jobs, state)
    assert sorted(ids(order)) == sorted(ids(jobs))
    assert len(order) == len(jobs)


@settings(max_examples=200, deadline=None)
@given(jobs=queues(), state=share_states())
def test_each_users_jobs_keep_created_at_order(jobs: list[QueuedJob], state: ShareState) -> None:
    order = fair_order(jobs, state)
    for user in range(USERS):
        mine = [q for q in order if q.user_id == user]
        assert mine == sorted(mine, key=lambda q: (q.created_at, q.job_id))


@settings(max_examples=200, deadline=None)
@given(jobs=queues(max_size=60))
def test_equal_weights_keep_tenants_within_one_of_each_other(jobs: list[QueuedJob]) -> None:
    order = fair_order(jobs, NOTHING)
    total = Counter(tenants(jobs))
    done: Counter[int] = Counter()
    for queued in order:
        done[queued.tenant_id] += 1
        waiting = [t for t in total if done[t] < total[t]]
        for t in waiting:
            for u in waiting:
                assert abs(done[t] - done[u]) <= 1, (done, total)


@settings(max_examples=200, deadline=None)
@given(
    jobs=queues(),
    state=share_states(),
    slots=st.integers(-2, 50),
    cap=st.integers(0, 4),
)
def test_pick_is_a_capped_prefix_choice(
    jobs: list[QueuedJob], state: ShareState, slots: int, cap: int
) -> None:
    order = fair_order(jobs, state)
    picked = pick_for_release(order, slots, state, cap)
    assert len(picked) <= max(0, slots)
    # A subsequence of the order, in order.
    positions = [order.index(q) for q in picked]
    assert positions == sorted(positions)
    if cap:
        per_user = Counter(users(picked))
        for user, n in per_user.items():
            assert state.user_active.get(user, 0) + n <= cap
    else:
        assert ids(picked) == ids(order[: max(0, slots)])


# ---------------------------------------------------------------- from users' lines
#
# The dispatcher and the status route compute the order from one row per user
# (counts, weights, first and last waiting job) instead of every queued job.
# These properties hold them to `fair_order` exactly.


@st.composite
def farms(draw: st.DrawFn) -> tuple[list[QueuedJob], list[UserLine]]:
    """Waiting jobs and consistent lines: in-flight counts per user, summed per tenant."""
    jobs = draw(queues(max_size=50))
    tenant_of = {user: tenant for user, tenant in draw(user_tenants())}
    jobs = [
        QueuedJob(q.job_id, tenant_of[q.user_id], q.user_id, q.created_at, work=q.work or 1.0)
        for q in jobs
    ]
    in_flight = draw(st.lists(st.integers(0, 5), min_size=USERS, max_size=USERS))
    weights = draw(st.lists(st.integers(1, 4), min_size=USERS, max_size=USERS))
    tenant_weights = draw(st.lists(st.integers(1, 4), min_size=4, max_size=4))
    lines = []
    for user in range(USERS):
        mine = sorted((q for q in jobs if q.user_id == user), key=job_key)
        if not mine and not in_flight[user]:
            continue
        lines.append(
            UserLine(
                user_id=user,
                tenant_id=tenant_of[user],
                weight=weights[user],
                tenant_weight=tenant_weights[tenant_of[user]],
                waiting=len(mine),
                in_flight=in_flight[user],
                waiting_work=sum(q.work for q in mine),
                head=mine[0] if mine else None,
                tail=mine[-1] if mine else None,
            )
        )
    return jobs, lines


@st.composite
def user_tenants(draw: st.DrawFn) -> list[tuple[int, int]]:
    return [(user, draw(st.integers(0, 3))) for user in range(USERS)]


def in_memory(jobs: list[QueuedJob]) -> tuple[FetchNext, ResolveKeys]:
    """fetch_next and resolve over a list of jobs, as the database answers them."""
    by_user: dict[int, list[QueuedJob]] = {}
    for q in sorted(jobs, key=job_key):
        by_user.setdefault(q.user_id, []).append(q)

    def fetch_next(line: UserLine, after: QueuedJob, limit: int) -> list[QueuedJob]:
        mine = by_user[line.user_id]
        start = mine.index(after) + 1
        return mine[start : start + limit]

    def resolve(asked: list[tuple[UserLine, int]]) -> dict[tuple[int, int], JobKey]:
        return {(line.user_id, k): job_key(by_user[line.user_id][k - 1]) for line, k in asked}

    return fetch_next, resolve


@settings(max_examples=300, deadline=None)
@given(farm=farms(), batch=st.integers(1, 4))
def test_the_lazy_merge_of_lines_is_the_fair_order(
    farm: tuple[list[QueuedJob], list[UserLine]], batch: int
) -> None:
    jobs, lines = farm
    fetch_next, _ = in_memory(jobs)
    assert ids(list(FairMerge(lines, fetch_next, batch))) == ids(
        fair_order(jobs, share_state(lines))
    )


@settings(max_examples=300, deadline=None)
@given(farm=farms(), slots=st.integers(0, 12), cap=st.integers(0, 4))
def test_release_from_lines_picks_what_the_full_order_picks(
    farm: tuple[list[QueuedJob], list[UserLine]], slots: int, cap: int
) -> None:
    jobs, lines = farm
    fetch_next, _ = in_memory(jobs)
    state = share_state(lines)
    assert ids(pick_for_release(FairMerge(lines, fetch_next, 2), slots, state, cap)) == ids(
        pick_for_release(fair_order(jobs, state), slots, state, cap)
    )


@settings(max_examples=300, deadline=None)
@given(farm=farms())
def test_jobs_ahead_from_lines_is_the_exact_position(
    farm: tuple[list[QueuedJob], list[UserLine]],
) -> None:
    jobs, lines = farm
    _, resolve = in_memory(jobs)
    order = fair_order(jobs, share_state(lines))
    asked: list[int] = []

    def counting(keys: list[tuple[UserLine, int]]) -> Mapping[tuple[int, int], JobKey]:
        asked.append(len(keys))
        return resolve(keys)

    for position, queued in enumerate(order):
        mine = sorted((q for q in jobs if q.user_id == queued.user_id), key=job_key)
        ahead = jobs_ahead(lines, queued, mine.index(queued) + 1, counting)
        assert (ahead.jobs, ahead.uncertain) == (position, 0), queued
        # Every job weighs one unit here, so the work ahead is the count.
        assert ahead.work == pytest.approx(position)
    assert len(asked) <= 2 * len(order)  # at most two reads per position


@settings(max_examples=300, deadline=None)
@given(farm=farms())
def test_without_reads_the_position_is_an_upper_bound_and_says_so(
    farm: tuple[list[QueuedJob], list[UserLine]],
) -> None:
    jobs, lines = farm
    order = fair_order(jobs, share_state(lines))
    for position, queued in enumerate(order):
        mine = sorted((q for q in jobs if q.user_id == queued.user_id), key=job_key)
        ahead = jobs_ahead(lines, queued, mine.index(queued) + 1, lambda keys: {})
        assert ahead.jobs >= position
        assert ahead.uncertain > 0 or ahead.jobs == position


def test_a_deep_tie_inside_a_tenant_of_many_users_is_read_not_guessed() -> None:
    # Tenant 1: users 1 and 2 with interleaved submissions; tenant 2: one user whose
    # third job ties with tenant 1's third job, which is neither first nor last.
    a = [job(f"a{i}", 1, 1, 2 * i) for i in range(4)]  # t = 0, 2, 4, 6
    b = [job(f"b{i}", 1, 2, 2 * i + 1) for i in range(4)]  # t = 1, 3, 5, 7
    c = [job(f"c{i}", 2, 3, 3.5 + i) for i in range(4)]  # t = 3.5, 4.5, ...
    jobs = a + b + c
    lines = [
        UserLine(1, 1, waiting=4, waiting_work=4, head=a[0], tail=a[-1]),
        UserLine(2, 1, waiting=4, waiting_work=4, head=b[0], tail=b[-1]),
        UserLine(3, 2, waiting=4, waiting_work=4, head=c[0], tail=c[-1]),
    ]
    _, resolve = in_memory(jobs)
    read: list[list[tuple[int, int]]] = []

    def recording(keys: list[tuple[UserLine, int]]) -> Mapping[tuple[int, int], JobKey]:
        read.append([(line.user_id, k) for line, k in keys])
        return resolve(keys)

    order = ids(fair_order(jobs, share_state(lines)))
    ahead = jobs_ahead(lines, c[2], 3, recording)
    assert ahead.jobs == order.index("c2") and ahead.uncertain == 0
    # Tenant 1's 3rd job is one of its users' 2nd jobs (t = 2 or 3): both read, in one call.
    assert read == [[(1, 2), (2, 2)]]
