"""Metric families, the events every process counts in Redis, and the counters read back.

Workers, the dispatcher and the API count what happens (requests submitted and
finished, images rendered, credits captured, queue waits, render times) in a
few Redis hashes, one pipeline per event, after the SQL commit that made it
happen. Redis keeps them across any process's restart, so a counter never goes
backwards when a worker or an API process restarts (only if Redis itself loses
its data, which Prometheus reads as a counter reset). A Redis error is logged
and swallowed: a metric is never worth a failed render.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import redis

log = logging.getLogger(__name__)

PREFIX: Final = "kolors_farm_"
_KEY: Final = "kolors-farm:metrics"
SUBMITTED_KEY: Final = f"{_KEY}:submitted"  # tenant id -> requests
FINISHED_KEY: Final = f"{_KEY}:finished"  # "tenant id:state" -> requests
IMAGES_KEY: Final = f"{_KEY}:images"  # tenant id -> images
CACHED_KEY: Final = f"{_KEY}:cached"  # tenant id -> images answered from the result cache
CREDITS_KEY: Final = f"{_KEY}:credits"  # tenant id -> millicredits
QUEUE_WAIT_KEY: Final = f"{_KEY}:queue_wait"  # "tenant id:le" -> observations, "tenant id:sum"
RENDER_KEY: Final = f"{_KEY}:render"  # the same for render times
DISPATCH_KEY: Final = f"{_KEY}:dispatch"  # what the dispatcher did -> jobs

# Upper bounds in seconds: a wait ranges from an idle farm's milliseconds to hours of
# backlog; a render from a small image's second to ten large images' minutes.
QUEUE_WAIT_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RENDER_BUCKETS: Final = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
DISPATCH_EVENTS: Final = ("released", "requeued", "republished")

MetricType = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Family:
    """One metric family the farm exposes: its name (without `_total`), type, help, labels."""

    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()

    def sample_names(self) -> tuple[str, ...]:
        """The names its samples carry in the text format (what PromQL queries)."""
        if self.type == "counter":
            return (f"{self.name}_total",)
        if self.type == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


SUBMITTED = Family(
    f"{PREFIX}requests_submitted", "counter", "Render requests accepted (queued).", ("tenant",)
)
FINISHED = Family(
    f"{PREFIX}requests_finished",
    "counter",
    "Render requests that ended, by final state (COMPLETED, FAILED, CANCELLED).",
    ("tenant", "state"),
)
IMAGES = Family(
    f"{PREFIX}images_rendered",
    "counter",
    "Images rendered, stored and recorded (each charged once).",
    ("tenant",),
)
CACHED = Family(
    f"{PREFIX}images_cached",
    "counter",
    "Images answered from the result cache instead of rendered (each charged once).",
    ("tenant",),
)
CREDITS = Family(
    f"{PREFIX}credits_captured",
    "counter",
    "Credits captured for delivered images, in credits.",
    ("tenant",),
)
QUEUE_WAIT = Family(
    f"{PREFIX}queue_wait_seconds",
    "histogram",
    "Time from a request's submission to its first start on a worker.",
    ("tenant",),
)
RENDER = Family(
    f"{PREFIX}render_seconds",
    "histogram",
    "Time a job's attempt spent in pipeline calls on its device, observed when it ends.",
    ("tenant",),
)
DISPATCHED = Family(
    f"{PREFIX}dispatcher_jobs",
    "counter",
    "What the dispatcher did to jobs: released to the workers, requeued after a lapsed "
    "lease, republished after a lost message.",
    ("event",),
)
QUEUE_DEPTH = Family(
    f"{PREFIX}queue_depth",
    "gauge",
    "Jobs waiting for the dispatcher to release them (tenants with work only).",
    ("tenant",),
)
IN_FLIGHT = Family(
    f"{PREFIX}jobs_in_flight",
    "gauge",
    "Jobs released to the workers or rendering (tenants with work only).",
    ("tenant",),
)
OLDEST_WAIT = Family(
    f"{PREFIX}queue_oldest_age_seconds",
    "gauge",
    "Age of the oldest waiting job (0 when none waits; tenants with work only).",
    ("tenant",),
)
WORKERS_LIVE = Family(f"{PREFIX}workers_live", "gauge", "Workers whose heartbeat is fresh.")
BUSY = Family(
    f"{PREFIX}worker_busy_fraction",
    "gauge",
    "Share of wall time the worker's device spent rendering over the last minute.",
    ("worker", "device"),
)
MEMORY_TOTAL = Family(
    f"{PREFIX}worker_memory_total_bytes",
    "gauge",
    "The worker's device memory (host memory for a CPU worker).",
    ("worker", "device"),
)
MEMORY_USED = Family(
    f"{PREFIX}worker_memory_used_bytes",
    "gauge",
    "Device memory in use on the worker's device, by any process.",
    ("worker", "device"),
)
DISPATCHER_ACTIVE = Family(
    f"{PREFIX}dispatcher_active", "gauge", "1 while a dispatcher holds the leader lock."
)
BACKEND_UP = Family(
    f"{PREFIX}backend_up",
    "gauge",
    "Whether the scrape could read the backend (database, redis); 0: its families are missing.",
    ("backend",),
)

FARM_FAMILIES: Final = (
    SUBMITTED,
    FINISHED,
    IMAGES,
    CACHED,
    CREDITS,
    QUEUE_WAIT,
    RENDER,
    DISPATCHED,
    QUEUE_DEPTH,
    IN_FLIGHT,
    OLDEST_WAIT,
    WORKERS_LIVE,
    BUSY,
    MEMORY_TOTAL,
    MEMORY_USED,
    DISPATCHER_ACTIVE,
    BACKEND_UP,
)


# ---------------------------------------------------------------- counting events


class _Pipeline(Protocol):
    def hincrby(self, name: str, key: str, amount: int = 1) -> Any: ...
    def hincrbyfloat(self, name: str, key: str, amount: float = 1.0) -> Any: ...


@dataclass(frozen=True)
class RequestSubmitted:
    """A request was accepted (its job and hold committed)."""

    tenant_id: int

    def apply(self, pipe: _Pipeline) -> None:
        """Add it to the pipeline."""
        pipe.hincrby(SUBMITTED_KEY, str(self.tenant_id), 1)


@dataclass(frozen=True)
class RequestFinished:
    """A request ended in `state` (COMPLETED, FAILED or CANCELLED)."""

    tenant_id: int
    state: str

    def apply(self, pipe: _Pipeline) -> None:
        """Add it to the pipeline."""
        pipe.hincrby(FINISHED_KEY, f"{self.tenant_id}:{self.state}", 1)


@dataclass(frozen=True)
class ImageRecorded:
    """An image was stored, recorded and charged `millicredits` (rendered, or from the cache)."""

    tenant_id: int
    millicredits: int
    cached: bool = False

    def apply(self, pipe: _Pipeline) -> None:
        """Add it to the pipeline."""
        pipe.hincrby(CACHED_KEY if self.cached else IMAGES_KEY, str(self.tenant_id), 1)
        pipe.hincrby(CREDITS_KEY, str(self.tenant_id), self.millicredits)


def bucket_of(seconds: float, buckets: tuple[float, ...]) -> str:
    """The field of the smallest bucket holding `seconds` (`+Inf` past the last)."""
    for bound in buckets:
        if seconds <= bound:
            return _le(bound)
    return "+Inf"


def _le(bound: float) -> str:
    return repr(float(bound))


@dataclass(frozen=True)
class QueueWait:
    """A request started `seconds` after it was submitted."""

    tenant_id: int
    seconds: float

    def apply(self, pipe: _Pipeline) -> None:
        """Add it to the pipeline."""
        _observe(pipe, QUEUE_WAIT_KEY, self.tenant_id, self.seconds, QUEUE_WAIT_BUCKETS)


@dataclass(frozen=True)
class RenderTime:
    """A job's attempt spent `seconds` in pipeline calls."""

    tenant_id: int
    seconds: float

    def apply(self, pipe: _Pipeline) -> None:
        """Add it to the pipeline."""
        _observe(pipe, RENDER_KEY, self.tenant_id, self.seconds, RENDER_BUCKETS)


def _observe(
    pipe: _Pipeline, key: str, tenant_id: int, seconds: float, buckets: tuple[float, ...]
) -> None:
    seconds = max(0.0, seconds)
    # One field per bucket, not cumulative: an observation is one HINCRBY, and the
    # scrape adds them up in bucket order.
    pipe.hincrby(key, f"{tenant_id}:{bucket_of(seconds, buckets)}", 1)
    pipe.hincrbyfloat(key, f"{tenant_id}:sum", seconds)


@dataclass(frozen=True)
class Dispatched:
    """What one dispatch pass did: jobs released, requeued, republished."""

    released: int = 0
    requeued: int = 0
    republished: int = 0

    def apply(self, pipe: _Pipeline) -> None:
        """Add it to the pipeline."""
        for event in DISPATCH_EVENTS:
            count = getattr(self, event)
            if count:
                pipe.hincrby(DISPATCH_KEY, event, count)


MetricEvent = (
    RequestSubmitted | RequestFinished | ImageRecorded | QueueWait | RenderTime | Dispatched
)


def record(client: redis.Redis, *events: MetricEvent) -> None:
    """Count events in one round trip; a Redis error is logged, never raised."""
    if not events:
        return
    try:
        with client.pipeline(transaction=False) as pipe:
            for event in events:
                event.apply(pipe)
            pipe.execute()
    except redis.RedisError as exc:
        # These events are lost to the counters; the jobs themselves are safe in SQL.
        log.warning("metrics not recorded (%s)", type(exc).__name__)


# ---------------------------------------------------------------- reading at scrape time


@dataclass
class Histogram:
    """One labelled histogram: observations per bucket (not cumulative) and their sum."""

    counts: dict[str, int] = field(default_factory=dict)
    sum: float = 0.0

    def cumulative(self, buckets: tuple[float, ...]) -> list[tuple[str, int]]:
        """(le, observations at or below it) for every bound and `+Inf`."""
        total = 0
        result = []
        for le in [*(_le(bound) for bound in buckets), "+Inf"]:
            total += self.counts.get(le, 0)
            result.append((le, total))
        return result


@dataclass
class Counters:
    """The event counters, keyed by tenant id (and state)."""

    submitted: dict[int, int] = field(default_factory=dict)
    finished: dict[tuple[int, str], int] = field(default_factory=dict)
    images: dict[int, int] = field(default_factory=dict)
    cached: dict[int, int] = field(default_factory=dict)
    millicredits: dict[int, int] = field(default_factory=dict)
    queue_wait: dict[int, Histogram] = field(default_factory=dict)
    render: dict[int, Histogram] = field(default_factory=dict)
    dispatched: dict[str, int] = field(default_factory=dict)

    def tenant_ids(self) -> set[int]:
        """Every tenant any counter names."""
        ids = set(self.submitted) | set(self.images) | set(self.cached) | set(self.millicredits)
        ids |= {tenant for tenant, _state in self.finished}
        return ids | set(self.queue_wait) | set(self.render)


def _by_tenant(raw: Mapping[bytes, bytes]) -> dict[int, int]:
    return {int(key): int(value) for key, value in raw.items()}


def _histograms(raw: Mapping[bytes, bytes]) -> dict[int, Histogram]:
    result: dict[int, Histogram] = {}
    for key, value in raw.items():
        tenant, _, part = key.decode().rpartition(":")
        histogram = result.setdefault(int(tenant), Histogram())
        if part == "sum":
            histogram.sum = float(value)
        else:
            histogram.counts[part] = int(value)
    return result


def read_counters(client: redis.Redis) -> Counters:
    """Every event counter, in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for key in (
            SUBMITTED_KEY,
            FINISHED_KEY,
            IMAGES_KEY,
            CACHED_KEY,
            CREDITS_KEY,
            QUEUE_WAIT_KEY,
            RENDER_KEY,
            DISPATCH_KEY,
        ):
            pipe.hgetall(key)
        submitted, finished, images, cached, credits, waits, renders, dispatched = pipe.execute()
    ends: dict[tuple[int, str], int] = {}
    for key, value in finished.items():
        tenant, _, state = key.decode().partition(":")
        ends[(int(tenant), state)] = int(value)
    return Counters(
        submitted=_by_tenant(submitted),
        finished=ends,
        images=_by_tenant(images),
        cached=_by_tenant(cached),
        millicredits=_by_tenant(credits),
        queue_wait=_histograms(waits),
        render=_histograms(renders),
        dispatched={key.decode(): int(value) for key, value in dispatched.items()},
    )
