"""`GET /metrics`: the farm's metrics and this API host's HTTP metrics, for Prometheus.

Two kinds of metrics share the page. The farm's (requests, images, credits,
queues, workers: `shared.metrics.counters`) are counted in Redis by every process and
read from Redis and SQL at scrape time, so every API replica serves the same
values. The HTTP metrics (requests by route and status, latency) belong to
this host's API processes: gunicorn runs several, so they use prometheus_client's
multiprocess mode (each process writes its values to files in
PROMETHEUS_MULTIPROC_DIR, which `api.server` chooses and empties before gunicorn
starts, and a scrape sums them; a dead process's counters stay counted).
`?scope=farm` or `?scope=api` serves one kind alone, so that Prometheus can
scrape the farm's once and each host's HTTP metrics from every host.

prometheus_client picks its storage (in memory, or files) when it is first
imported, so this module imports it only inside functions: `python -m api`
imports the app before `api.server` has set the directory.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import redis
from flask import Blueprint, Flask, Response, current_app, g, request
from sqlalchemy.exc import InterfaceError, OperationalError

from api.context import farm
from api.errors import problem
from shared.clock import database_now
from shared.db import read_only
from shared.errors import InvalidParams
from shared.metrics.counters import (
    BACKEND_UP,
    BUSY,
    CACHED,
    CREDITS,
    DISPATCHED,
    DISPATCHER_ACTIVE,
    FARM_FAMILIES,
    FINISHED,
    IMAGES,
    IN_FLIGHT,
    MEMORY_TOTAL,
    MEMORY_USED,
    OLDEST_WAIT,
    PREFIX,
    QUEUE_DEPTH,
    QUEUE_WAIT,
    QUEUE_WAIT_BUCKETS,
    RENDER,
    RENDER_BUCKETS,
    SUBMITTED,
    WORKERS_LIVE,
    Counters,
    Family,
    Histogram,
    read_counters,
)
from shared.metrics.readings import (
    TenantLoad,
    WorkerGauge,
    active_tenants,
    dispatcher_active,
    tenant_names,
    worker_gauges,
)
from shared.resources import Resources

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge
    from prometheus_client import Histogram as HistogramMetric
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
SCOPES: Final = ("all", "farm", "api")
_STATE_KEY: Final = "kolors_farm.metrics"
_UNMATCHED: Final = "unmatched"  # 404s: the raw path would make a label per URL

HTTP_REQUESTS = Family(
    f"{PREFIX}http_requests",
    "counter",
    "HTTP requests answered by this host's API processes, by route template and status.",
    ("route", "method", "status"),
)
HTTP_DURATION = Family(
    f"{PREFIX}http_request_duration_seconds",
    "histogram",
    "Time to answer an HTTP request (a synchronous render's wait included).",
    ("route", "method"),
)
HTTP_IN_PROGRESS = Family(
    f"{PREFIX}http_requests_in_progress",
    "gauge",
    "HTTP requests being answered now by this host's live API processes.",
)
HTTP_FAMILIES: Final = (HTTP_REQUESTS, HTTP_DURATION, HTTP_IN_PROGRESS)
HTTP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def exposed_families() -> tuple[Family, ...]:
    """Every family `/metrics` can serve (dashboards may query only these)."""
    return (*FARM_FAMILIES, *HTTP_FAMILIES)


def exposed_sample_names() -> set[str]:
    """Every sample name `/metrics` can serve, as PromQL spells them."""
    return {name for family in exposed_families() for name in family.sample_names()}


# ---------------------------------------------------------------- multiprocess set-up


def prepare_multiprocess_dir(default: Path) -> Path:
    """Choose (PROMETHEUS_MULTIPROC_DIR, else `default`) and empty the HTTP metrics directory.

    Call it before gunicorn starts its processes: they inherit the variable. Files
    left by an earlier run would be summed into this one's counters, so they go;
    only the `*.db` files prometheus_client writes are removed.
    """
    path = Path(os.environ.get(MULTIPROC_ENV) or default)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def mark_process_dead(pid: int) -> None:
    """Forget a dead API process's live gauges (gunicorn's child_exit); its counters stay."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _multiprocess() -> bool:
    if not os.environ.get(MULTIPROC_ENV):
        return False
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        # Values would stay in this process's memory and each scrape would show one
        # process's share: refuse rather than serve wrong numbers.
        raise RuntimeError(
            f"prometheus_client was imported before {MULTIPROC_ENV} was set; "
            "set it before the API starts (api.server does)"
        )
    return True


class _HttpMetrics:
    """One app's HTTP metrics (per process; summed across processes in multiprocess mode)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, disable_created_metrics
        from prometheus_client import Histogram as HistogramMetric

        self.multiprocess = _multiprocess()
        # Multiprocess mode has no `_created` series; the page is the same in both modes.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        # registry=None: each scrape builds its own registry (one app per test would
        # otherwise register the same names twice in the global one).
        self.requests: Counter = Counter(
            HTTP_REQUESTS.name, HTTP_REQUESTS.help, HTTP_REQUESTS.labels, registry=None
        )
        self.duration: HistogramMetric = HistogramMetric(
            HTTP_DURATION.name,
            HTTP_DURATION.help,
            HTTP_DURATION.labels,
            buckets=HTTP_BUCKETS,
            registry=None,
        )
        self.in_progress: Gauge = Gauge(
            HTTP_IN_PROGRESS.name,
            HTTP_IN_PROGRESS.help,
            registry=None,
            multiprocess_mode="livesum",
        )

    def collectors(self) -> list[Any]:
        """What a scrape registers for the HTTP metrics."""
        if self.multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            # Reads every process's files, the dead ones' counters included.
            return [MultiProcessCollector(None)]  # type: ignore[no-untyped-call]
        return [self.requests, self.duration, self.in_progress]


@bp.record_once
def _set_up(state: Any) -> None:
    app: Flask = state.app
    app.extensions[_STATE_KEY] = _HttpMetrics()


def _http() -> _HttpMetrics:
    metrics: _HttpMetrics = current_app.extensions[_STATE_KEY]
    return metrics


@bp.before_app_request
def _request_started() -> None:
    g.metrics_started = time.perf_counter()
    _http().in_progress.inc()


@bp.after_app_request
def _request_answered(response: Response) -> Response:
    started: float | None = g.get("metrics_started")
    if started is not None:
        route = request.url_rule.rule if request.url_rule is not None else _UNMATCHED
        metrics = _http()
        metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        metrics.duration.labels(route, request.method).observe(time.perf_counter() - started)
    return response


@bp.teardown_app_request
def _request_ended(_error: BaseException | None) -> None:
    if g.pop("metrics_started", None) is not None:
        _http().in_progress.dec()


# ---------------------------------------------------------------- the farm's metrics


class FarmCollector:
    """The farm's families, read from Redis and SQL when scraped."""

    def __init__(self, resources: Resources) -> None:
        self._resources = resources

    def collect(self) -> Iterator[Metric]:
        """Counters, queues and workers; a backend that does not answer leaves its out."""
        resources = self._resources
        up = _gauge(BACKEND_UP)
        counters: Counters | None = None
        workers: list[WorkerGauge] = []
        leader = False
        try:
            counters = read_counters(resources.redis)
            workers = worker_gauges(resources.redis)
            leader = dispatcher_active(resources.redis)
        except redis.RedisError as exc:
            log.warning("metrics: Redis unavailable (%s)", type(exc).__name__)
            counters = None
        loads: list[TenantLoad] | None = None
        names: dict[int, str] = {}
        now: datetime | None = None  # the database's: its jobs' times are on its clock
        try:
            with read_only(resources.sessions) as session:
                loads = active_tenants(session)
                now = database_now(session)
                if counters is not None:
                    names = tenant_names(session, counters.tenant_ids())
        except (OperationalError, InterfaceError) as exc:
            log.warning("metrics: database unavailable (%s)", type(exc).__name__)
            loads = None
        up.add_metric(["database"], 1 if loads is not None else 0)
        up.add_metric(["redis"], 1 if counters is not None else 0)
        yield up
        if counters is not None:
            yield from _dispatcher_families(counters, leader)
            yield from _worker_families(workers)
        if counters is not None and loads is not None:
            # Without the database the tenants have no names: leave the samples out
            # (a gap) rather than label them by id for one scrape.
            yield from _tenant_counter_families(counters, names)
        if loads is not None and now is not None:
            yield from _queue_families(loads, now)


def _gauge(family: Family) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(family.name, family.help, labels=family.labels)


def _counter(family: Family) -> CounterMetricFamily:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(family.name, family.help, labels=family.labels)


def _histogram(family: Family) -> HistogramMetricFamily:
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(family.name, family.help, labels=family.labels)


def _tenant_counter_families(counters: Counters, names: dict[int, str]) -> Iterator[Metric]:
    def tenant(tenant_id: int) -> str:
        return names.get(tenant_id, f"#{tenant_id}")  # a tenant since deleted

    submitted = _counter(SUBMITTED)
    for tenant_id, value in sorted(counters.submitted.items()):
        submitted.add_metric([tenant(tenant_id)], value)
    finished = _counter(FINISHED)
    for (tenant_id, state), value in sorted(counters.finished.items()):
        finished.add_metric([tenant(tenant_id), state], value)
    images = _counter(IMAGES)
    for tenant_id, value in sorted(counters.images.items()):
        images.add_metric([tenant(tenant_id)], value)
    cached = _counter(CACHED)
    for tenant_id, value in sorted(counters.cached.items()):
        cached.add_metric([tenant(tenant_id)], value)
    credits = _counter(CREDITS)
    for tenant_id, value in sorted(counters.millicredits.items()):
        credits.add_metric([tenant(tenant_id)], value / 1000)
    yield from (submitted, finished, images, cached, credits)
    for family, histograms, buckets in (
        (QUEUE_WAIT, counters.queue_wait, QUEUE_WAIT_BUCKETS),
        (RENDER, counters.render, RENDER_BUCKETS),
    ):
        yield _histogram_family(family, histograms, buckets, tenant)


def _histogram_family(
    family: Family,
    histograms: dict[int, Histogram],
    buckets: tuple[float, ...],
    tenant: Callable[[int], str],
) -> HistogramMetricFamily:
    metric = _histogram(family)
    for tenant_id, histogram in sorted(histograms.items()):
        metric.add_metric([tenant(tenant_id)], histogram.cumulative(buckets), histogram.sum)
    return metric


def _queue_families(loads: list[TenantLoad], now: datetime) -> Iterator[Metric]:
    depth, in_flight, oldest = _gauge(QUEUE_DEPTH), _gauge(IN_FLIGHT), _gauge(OLDEST_WAIT)
    for load in loads:
        depth.add_metric([load.tenant], load.waiting)
        in_flight.add_metric([load.tenant], load.in_flight)
        oldest.add_metric([load.tenant], load.oldest_age_s(now))
    yield from (depth, in_flight, oldest)


def _worker_families(workers: list[WorkerGauge]) -> Iterator[Metric]:
    live = _gauge(WORKERS_LIVE)
    live.add_metric([], len(workers))
    busy, total, used = _gauge(BUSY), _gauge(MEMORY_TOTAL), _gauge(MEMORY_USED)
    for worker in workers:
        labels = [worker.name, worker.device]
        for metric, value in (
            (busy, worker.busy_fraction),
            (total, worker.memory_total_bytes),
            (used, worker.memory_used_bytes),
        ):
            if value is not None:
                metric.add_metric(labels, value)
    yield from (live, busy, total, used)


def _dispatcher_families(counters: Counters, leader: bool) -> Iterator[Metric]:
    active = _gauge(DISPATCHER_ACTIVE)
    active.add_metric([], 1 if leader else 0)
    dispatched = _counter(DISPATCHED)
    for event, value in sorted(counters.dispatched.items()):
        dispatched.add_metric([event], value)
    yield from (active, dispatched)


# ---------------------------------------------------------------- the route


def _authorized(token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


@bp.get("/metrics")
def metrics() -> Response:
    """The metrics in Prometheus' text format; `scope` = all (default), farm or api."""
    from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest

    resources = farm()
    token = resources.settings.metrics_token
    if token is not None and not _authorized(token.get_secret_value()):
        response = problem(401, "Unauthorized", "This endpoint needs the metrics bearer token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    scope = request.args.get("scope", "all")
    if scope not in SCOPES:
        raise InvalidParams.single("scope", "enum", f"scope must be one of {', '.join(SCOPES)}")
    registry = CollectorRegistry(auto_describe=False)
    if scope in ("all", "farm"):
        registry.register(FarmCollector(resources))
    if scope in ("all", "api"):
        for collector in _http().collectors():
            registry.register(collector)
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_PLAIN_0_0_4)
