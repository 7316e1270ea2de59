"""GET /metrics: the farm's counters, queues and workers, and the API's HTTP metrics.

In-process tests drive the API and the dispatcher on real Redis and both
databases; the farm tests run a worker on the tiny checkpoint, the dispatcher
and the API under gunicorn with two processes, and read what their jobs imply
from the scraped text (parsed with prometheus_client's own parser).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy
from celery import Celery
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.metrics import MULTIPROC_ENV, exposed_families, prepare_multiprocess_dir
from control.dispatcher import Dispatcher
from control.processes import free_port
from shared.celery_app import make_celery
from shared.db import transaction
from shared.jobs.params import KolorsParams
from shared.jobs.transitions import claim_job
from shared.metrics.counters import (
    QUEUE_WAIT_BUCKETS,
    ImageRecorded,
    QueueWait,
    RenderTime,
    bucket_of,
    read_counters,
    record,
)
from shared.metrics.readings import active_tenants_query
from shared.migrate import migrate_database
from shared.models import Job, utcnow
from shared.redis_client import make_redis
from shared.settings import Settings
from tests.conftest import ApiUser, make_job, release_job, resources_for
from tests.farms import FarmFactory
from tests.processes import FarmProcesses, wait_for

QUICK = {"prompt": "a fox", "width": 512, "height": 512, "steps": 2}  # 0.02 credits an image


# ---------------------------------------------------------------- reading the text format

Labels = frozenset[tuple[str, str]]


@dataclass
class Scrape:
    """One scrape's samples by name and labels, and the families it named."""

    samples: dict[tuple[str, Labels], float]
    families: dict[str, str]  # name -> type

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def series(self, name: str) -> dict[Labels, float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}


def parse(text: str) -> Scrape:
    samples: dict[tuple[str, Labels], float] = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, families)


def scrape_client(client: FlaskClient, query: str = "") -> Scrape:
    response = client.get(f"/metrics{query}")
    assert response.status_code == 200, response.text
    assert response.content_type.startswith("text/plain; version=0.0.4")
    return parse(response.text)


def assert_known_families(scrape: Scrape) -> None:
    known = {family.name: family.type for family in exposed_families()}
    for name, kind in scrape.families.items():
        assert known.get(name) == kind, f"{name} ({kind}) is not declared"


# ---------------------------------------------------------------- in process


def test_api_counts_submissions_and_cancels_and_shows_the_queue(
    client: FlaskClient, alice: ApiUser
) -> None:
    ids = []
    for _ in range(3):
        response = client.post("/v2/kolors", json=QUICK, headers=alice.headers)
        assert response.status_code == 202, response.text
        ids.append(response.json["request_id"])  # type: ignore[index]
    assert client.delete(f"/v2/requests/{ids[0]}", headers=alice.headers).status_code == 200
    # Cancelling again changes nothing and counts nothing.
    assert client.delete(f"/v2/requests/{ids[0]}", headers=alice.headers).status_code == 200

    farm = scrape_client(client, "?scope=farm")
    assert farm.value("kolors_farm_requests_submitted_total", tenant="alice") == 3
    assert farm.series("kolors_farm_requests_finished_total") == {
        frozenset({("tenant", "alice"), ("state", "CANCELLED")}): 1
    }
    # No dispatcher runs here: two jobs wait, none is in flight.
    assert farm.value("kolors_farm_queue_depth", tenant="alice") == 2
    assert farm.value("kolors_farm_jobs_in_flight", tenant="alice") == 0
    oldest = farm.value("kolors_farm_queue_oldest_age_seconds", tenant="alice")
    assert oldest is not None and oldest >= 0
    assert farm.value("kolors_farm_workers_live") == 0
    assert farm.value("kolors_farm_dispatcher_active") == 0
    assert farm.value("kolors_farm_backend_up", backend="database") == 1
    assert farm.value("kolors_farm_backend_up", backend="redis") == 1
    assert not any(name.startswith("kolors_farm_http_") for name in farm.families)
    assert_known_families(farm)

    http = scrape_client(client, "?scope=api")
    posted = {"route": "/v2/kolors", "method": "POST", "status": "202"}
    assert http.value("kolors_farm_http_requests_total", **posted) == 3
    cancelled = {"route": "/v2/requests/<job_id>", "method": "DELETE", "status": "200"}
    assert http.value("kolors_farm_http_requests_total", **cancelled) == 2
    latency = {"route": "/v2/kolors", "method": "POST"}
    assert http.value("kolors_farm_http_request_duration_seconds_count", **latency) == 3
    assert http.value("kolors_farm_http_requests_in_progress") == 1  # this scrape
    assert set(http.families) == {
        "kolors_farm_http_requests",
        "kolors_farm_http_request_duration_seconds",
        "kolors_farm_http_requests_in_progress",
    }
    # An unknown path is labelled as such, not by the path (one series per URL otherwise).
    client.get("/no/such/page")
    after = scrape_client(client)
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert after.value("kolors_farm_http_requests_total", **unmatched) == 1
    assert after.value("kolors_farm_requests_submitted_total", tenant="alice") == 3
    assert_known_families(after)


def test_metrics_scope_is_validated(client: FlaskClient) -> None:
    response = client.get("/metrics?scope=everything")
    assert response.status_code == 400
    assert response.content_type == "application/problem+json"
    assert response.json["errors"][0]["field"] == "scope"  # type: ignore[index]
    assert response.json["errors"][0]["rule"] == "enum"  # type: ignore[index]


def test_metrics_bearer_token_when_configured(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"metrics_token": SecretStr("s3cret-token")}))
    client = app.test_client()
    try:
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert "s3cret" not in refused.text
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        served = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert served.status_code == 200
        assert "kolors_farm_backend_up" in served.text
    finally:
        app.extensions["kolors_farm"].engine.dispose()


def test_a_scrape_during_an_outage_says_which_backend_is_missing(tmp_path: Path) -> None:
    down = Settings(
        data_dir=tmp_path / "var",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        database_url=f"sqlite:///{tmp_path / 'missing' / 'farm.db'}",  # no such directory
    )
    app = create_app(down)
    try:
        response = app.test_client().get("/metrics")
    finally:
        app.extensions["kolors_farm"].engine.dispose()
    assert response.status_code == 200
    scrape = parse(response.text)
    assert scrape.value("kolors_farm_backend_up", backend="database") == 0
    assert scrape.value("kolors_farm_backend_up", backend="redis") == 0
    # Left out, not reported as zero: a zero would read as a counter reset.
    assert "kolors_farm_requests_submitted" not in scrape.families
    assert "kolors_farm_queue_depth" not in scrape.families


def test_dispatcher_counts_its_releases_and_the_jobs_its_recovery_ends(
    settings: Settings, sessions: sessionmaker[Session], alice: ApiUser, client: FlaskClient
) -> None:
    def submit() -> str:
        params = KolorsParams(prompt="a cat", width=512, height=512, steps=2)
        return make_job(sessions, alice, params, deadline=timedelta(1)).id

    lost, late = submit(), submit()
    with transaction(sessions) as session:
        spec = claim_job(session, release_job(session, lost), "gone", timedelta(minutes=5))
    assert spec is not None
    with transaction(sessions) as session:
        past = utcnow() - timedelta(minutes=1)
        session.execute(update(Job).where(Job.id == lost).values(lease_expires_at=past))
        session.execute(update(Job).where(Job.id == late).values(deadline_at=past))
    celery: Celery = make_celery(settings)
    tuned = settings.model_copy(update={"max_attempts": 1, "dispatch_margin": 1})
    dispatcher = Dispatcher(resources_for(tuned, sessions), celery)
    fresh = submit()
    report = dispatcher.run_pass()
    celery.close()
    assert report.failed == [lost] and report.expired == [late] and report.released == [fresh]

    farm = scrape_client(client, "?scope=farm")
    finished = farm.series("kolors_farm_requests_finished_total")
    assert finished == {
        frozenset({("tenant", "alice"), ("state", "FAILED")}): 1,
        frozenset({("tenant", "alice"), ("state", "CANCELLED")}): 1,
    }
    assert farm.value("kolors_farm_dispatcher_jobs_total", event="released") == 1
    assert farm.value("kolors_farm_jobs_in_flight", tenant="alice") == 1
    assert farm.value("kolors_farm_queue_depth", tenant="alice") == 0


def test_histograms_are_cumulative_and_a_redis_outage_is_not_an_error(redis_url: str) -> None:
    client = make_redis(redis_url)
    assert bucket_of(0.1, QUEUE_WAIT_BUCKETS) == "0.1"  # bounds are inclusive
    assert bucket_of(0.11, QUEUE_WAIT_BUCKETS) == "0.25"
    assert bucket_of(1e9, QUEUE_WAIT_BUCKETS) == "+Inf"
    record(client, QueueWait(7, 0.05), QueueWait(7, 3.0), QueueWait(7, 7200), RenderTime(7, 2))
    counters = read_counters(client)
    waits = dict(counters.queue_wait[7].cumulative(QUEUE_WAIT_BUCKETS))
    assert (waits["0.1"], waits["2.5"], waits["5.0"], waits["3600.0"], waits["+Inf"]) == (
        1,
        1,
        2,
        2,
        3,
    )
    assert counters.queue_wait[7].sum == pytest.approx(7203.05)
    assert counters.render[7].sum == 2
    # Images answered from the result cache are counted apart from rendered ones.
    record(client, ImageRecorded(7, 40), ImageRecorded(7, 0, cached=True))
    counters = read_counters(client)
    assert (counters.images[7], counters.cached[7], counters.millicredits[7]) == (1, 1, 40)
    client.close()

    unreachable = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    record(unreachable, QueueWait(7, 1.0))  # logged, not raised: a render never fails for it


def test_the_multiprocess_directory_is_emptied_of_old_values_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    (chosen / "counter_4242.db").write_bytes(b"old counts")
    (chosen / "notes.txt").write_text("not ours")
    monkeypatch.setenv(MULTIPROC_ENV, str(chosen))  # restored after the test
    assert prepare_multiprocess_dir(tmp_path / "default") == chosen
    assert sorted(path.name for path in chosen.iterdir()) == ["notes.txt"]
    monkeypatch.delenv(MULTIPROC_ENV)
    default = prepare_multiprocess_dir(tmp_path / "default")
    assert default.is_dir() and os.environ[MULTIPROC_ENV] == str(default)


def test_the_queue_gauges_read_an_index_not_the_jobs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    migrate_database(url)
    engine = sqlalchemy.create_engine(url)
    statement = active_tenants_query().compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as connection:
        plan = " ".join(
            str(row[-1]) for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}")
        )
    engine.dispose()
    assert "ix_user_queues_active" in plan, plan
    assert "jobs" not in plan, plan


# ---------------------------------------------------------------- a farm under gunicorn

WORKER = "metrics-cpu0"


@dataclass
class Farm:
    url: str
    processes: FarmProcesses

    def scrape(self, query: str = "") -> Scrape:
        response = httpx.get(f"{self.url}/metrics{query}", timeout=10)
        assert response.status_code == 200, response.text
        return parse(response.text)


def _api_children(pid: int) -> set[int]:
    """The gunicorn worker processes of the API (children of its master)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(child) for child in children.read_text().split()}


@pytest.fixture(scope="module")
def farm(module_farms: FarmFactory) -> Farm:
    running = module_farms.start(
        "metrics",
        workers=[WORKER],
        api_args=("--processes", "2"),
        # No job is released ahead of a free worker: the rest wait.
        settings={"dispatch_margin": "0"},
    )
    return Farm(url=running.url, processes=running.processes)


def _submit(farm: Farm, key: str, **params: Any) -> str:
    response = httpx.post(f"{farm.url}/v2/kolors", json=params, headers={"x-api-key": key})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["request_id"]
    return job_id


def _status(farm: Farm, key: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{farm.url}/v2/requests/{job_id}/status", headers={"x-api-key": key})
    body: dict[str, Any] = response.json()
    return body


def _wait_status(farm: Farm, key: str, job_id: str, *states: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = _status(farm, key, job_id)
        return body if body["status"] in states else None

    return wait_for(reached, 90, f"job {job_id} to be {states}")


def _credits(farm: Farm, key: str) -> Decimal:
    response = httpx.get(f"{farm.url}/v1/get-user-credits", headers={"x-api-key": key})
    return Decimal(response.json()["credits"])


def test_farm_metrics_follow_the_jobs(farm: Farm) -> None:
    alice = farm.processes.create_user("alice", "100", tenant="studio")
    bob = farm.processes.create_user("bob", "10", tenant="lab")

    done = _submit(farm, alice, **QUICK, number_of_images=2)
    _wait_status(farm, alice, done, "COMPLETED")
    # Ten large images keep the only worker busy until cancelled.
    long = _submit(farm, alice, prompt="a city", width=1024, height=1024, steps=50,
                   number_of_images=10)  # fmt: skip
    _wait_status(farm, alice, long, "PROCESSING")
    dropped, queued = _submit(farm, bob, **QUICK), _submit(farm, bob, **QUICK)

    def busy_farm() -> Scrape | None:
        scrape = farm.scrape()
        busy = scrape.value("kolors_farm_worker_busy_fraction", worker=WORKER, device="cpu")
        return scrape if busy and scrape.value("kolors_farm_queue_depth", tenant="lab") else None

    during = wait_for(busy_farm, 30, "a busy worker and lab's queue in the metrics")
    assert during.value("kolors_farm_queue_depth", tenant="lab") == 2
    assert during.value("kolors_farm_jobs_in_flight", tenant="lab") == 0
    assert during.value("kolors_farm_queue_oldest_age_seconds", tenant="lab") >= 0  # type: ignore[operator]
    assert during.value("kolors_farm_queue_depth", tenant="studio") == 0
    assert during.value("kolors_farm_jobs_in_flight", tenant="studio") == 1
    assert during.value("kolors_farm_workers_live") == 1
    busy = during.value("kolors_farm_worker_busy_fraction", worker=WORKER, device="cpu")
    assert busy is not None and 0 < busy <= 1
    total = during.value("kolors_farm_worker_memory_total_bytes", worker=WORKER, device="cpu")
    used = during.value("kolors_farm_worker_memory_used_bytes", worker=WORKER, device="cpu")
    assert total is not None and used is not None and 0 < used <= total
    assert during.value("kolors_farm_dispatcher_active") == 1

    for key, job_id in ((bob, dropped), (alice, long)):
        response = httpx.delete(f"{farm.url}/v2/requests/{job_id}", headers={"x-api-key": key})
        assert response.status_code == 200
    _wait_status(farm, bob, queued, "COMPLETED")
    stopped = _wait_status(farm, alice, long, "FAILED")
    long_images = stopped["progress"]["images_done"]

    expected = {
        ("kolors_farm_requests_finished_total", "studio", "COMPLETED"): 1,
        ("kolors_farm_requests_finished_total", "studio", "CANCELLED"): 1,
        ("kolors_farm_requests_finished_total", "lab", "CANCELLED"): 1,
        ("kolors_farm_requests_finished_total", "lab", "COMPLETED"): 1,
    }

    def settled() -> Scrape | None:
        scrape = farm.scrape()
        ends = {
            (name, dict(labels)["tenant"], dict(labels)["state"]): value
            for (name, labels), value in scrape.samples.items()
            if name == "kolors_farm_requests_finished_total"
        }
        return scrape if ends == expected else None

    after = wait_for(settled, 30, "every job's end in the metrics")
    assert after.value("kolors_farm_requests_submitted_total", tenant="studio") == 2
    assert after.value("kolors_farm_requests_submitted_total", tenant="lab") == 2
    assert after.value("kolors_farm_images_rendered_total", tenant="studio") == 2 + long_images
    assert after.value("kolors_farm_images_rendered_total", tenant="lab") == 1
    # Every hold is settled: what left a balance is what was captured.
    for key, tenant, granted in ((alice, "studio", 100), (bob, "lab", 10)):
        captured = after.value("kolors_farm_credits_captured_total", tenant=tenant)
        assert captured == pytest.approx(float(granted - _credits(farm, key)))
    # Started jobs waited once each; the cancelled queued job never started.
    assert after.value("kolors_farm_queue_wait_seconds_count", tenant="studio") == 2
    assert after.value("kolors_farm_queue_wait_seconds_count", tenant="lab") == 1
    assert after.value("kolors_farm_queue_wait_seconds_bucket", tenant="lab", le="+Inf") == 1
    assert after.value("kolors_farm_render_seconds_count", tenant="studio") == 2
    assert after.value("kolors_farm_render_seconds_count", tenant="lab") == 1
    assert after.value("kolors_farm_render_seconds_sum", tenant="studio") > 0  # type: ignore[operator]
    assert after.value("kolors_farm_dispatcher_jobs_total", event="released") == 3
    # Nothing waits or flies any more: no tenant has queue samples.
    assert after.series("kolors_farm_queue_depth") == {}
    assert_known_families(after)


def test_counters_hold_across_an_api_process_restart(farm: Farm) -> None:
    api = farm.processes.procs["api"]
    children: set[int] = wait_for(
        lambda: c if len(c := _api_children(api.pid)) == 2 else None, 30, "two API processes"
    )
    healthz = {"route": "/healthz", "method": "GET", "status": "200"}
    before = farm.scrape()
    seen = before.value("kolors_farm_http_requests_total", **healthz) or 0
    for _ in range(20):  # a connection each: both processes answer some
        assert httpx.get(f"{farm.url}/healthz").status_code == 200
    counted = farm.scrape()
    # Whichever process answers the scrape, it sums every process's counts.
    assert counted.value("kolors_farm_http_requests_total", **healthz) == seen + 20

    victim = min(children)
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: victim not in (now := _api_children(api.pid)) and len(now) == 2,
        30,
        "gunicorn to replace the killed process",
    )
    for _ in range(4):  # either process may answer; each serves the same totals
        after = farm.scrape()
        assert after.value("kolors_farm_http_requests_total", **healthz) == seen + 20
        assert after.value("kolors_farm_http_requests_in_progress") == 1  # this scrape only
        for name in (
            "kolors_farm_requests_submitted_total",
            "kolors_farm_requests_finished_total",
            "kolors_farm_images_rendered_total",
            "kolors_farm_credits_captured_total",
            "kolors_farm_queue_wait_seconds_count",
        ):
            assert after.series(name) == counted.series(name), name
