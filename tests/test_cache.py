"""The result cache: identical requests answered from retained images, on real parts.

The SQL rules run in-process through the Flask app on both databases, with originals
recorded through the domain functions (as a worker records them) and a worker's
heartbeat in the real Redis naming the render fingerprint. The end-to-end test runs a
real farm (worker, dispatcher, API under gunicorn) on the tiny checkpoint: one render,
then the identical request answered without the worker.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from control.processes import free_port
from shared.accounts.ledger import get_balance, held_for_job, ledger_balance
from shared.accounts.pricing import price_per_image
from shared.db import make_engine, read_only, transaction
from shared.jobs.cache import (
    FINGERPRINT_FIELD,
    cache_key,
    cached_price,
    find_cached_images,
    fleet_fingerprint,
    image_cache_keys,
    render_fingerprint,
)
from shared.jobs.imaging import encode_image
from shared.jobs.params import KolorsParams
from shared.jobs.transitions import (
    claim_job,
    finish_job,
    image_storage_key,
    record_image,
)
from shared.models import Job, JobImage, JobState, LedgerEntry
from shared.redis_client import make_redis
from shared.scheduling.fleet import forget_worker, live_workers, record_heartbeat
from shared.settings import Settings
from shared.storage import LocalStorage, ObjectMissing, S3Storage, make_storage
from tests.conftest import ApiUser, make_job, make_user, release_job, resources_for
from tests.farms import FarmFactory, RunningFarm
from tests.processes import wait_for

FINGERPRINT = "f" * 64
OTHER_FINGERPRINT = "e" * 64
# 520x512 at 1 step costs 11 millicredits an image at the default price (10.16, rounded up),
# so half of it, 5.5, shows the rounding up to 6.
REQUEST: dict[str, Any] = {
    "prompt": "a lighthouse at dawn",
    "width": 520,
    "height": 512,
    "steps": 1,
    "seed": 1234,
    "output_format": "png",
}
UNIT_PRICE = 11


# ------------------------------------------------------------------ the key, without a database


def test_the_key_covers_every_input_that_changes_the_bytes_and_nothing_else() -> None:
    params = KolorsParams.model_validate(REQUEST)
    key = cache_key(params, 1234, FINGERPRINT)
    changed = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "fog",
        "cfg": 7.5,
        "steps": 2,
        "width": 528,
        "height": 520,
        "scheduler": "DDIMScheduler",
        "output_format": "webp",
        "output_quality": 81,
    }
    for name, value in changed.items():
        other = params.model_copy(update={name: value})
        assert cache_key(other, 1234, FINGERPRINT) != key, name
    assert cache_key(params, 1235, FINGERPRINT) != key
    assert cache_key(params, 1234, OTHER_FINGERPRINT) != key
    # Not rendering inputs: how many images, the base seed (each image's own is keyed),
    # the answer's shape.
    same = params.model_copy(update={"number_of_images": 3, "seed": 99, "base64": True})
    assert cache_key(same, 1234, FINGERPRINT) == key
    # "jpg" names the jpeg encoder: the same bytes.
    jpg = KolorsParams.model_validate(REQUEST | {"output_format": "jpg"})
    jpeg = KolorsParams.model_validate(REQUEST | {"output_format": "jpeg"})
    assert cache_key(jpg, 1, FINGERPRINT) == cache_key(jpeg, 1, FINGERPRINT)
    assert len(key) == 64 and int(key, 16) >= 0
    # Image i uses seed + i, wrapping at 2^32.
    wrapped = params.model_copy(update={"number_of_images": 2, "seed": 2**32 - 1})
    assert image_cache_keys(wrapped, 2**32 - 1, FINGERPRINT) == [
        cache_key(params, 2**32 - 1, FINGERPRINT),
        cache_key(params, 0, FINGERPRINT),
    ]


def test_the_fingerprint_names_weights_libraries_and_numerics() -> None:
    base: dict[str, Any] = {
        "device_type": "cuda",
        "dtype": "bfloat16",
        "options": {"channels_last": False},
    }
    versions = {"torch": "2.13.0", "diffusers": "0.35.0", "transformers": "4.56.0"}
    fingerprint = render_fingerprint("a" * 64, versions, **base)
    assert render_fingerprint("a" * 64, dict(versions), **base) == fingerprint
    assert render_fingerprint("b" * 64, versions, **base) != fingerprint
    assert render_fingerprint("a" * 64, versions | {"torch": "2.14.0"}, **base) != fingerprint
    assert render_fingerprint("a" * 64, versions, **base | {"dtype": "float16"}) != fingerprint
    assert render_fingerprint("a" * 64, versions, **base | {"device_type": "cpu"}) != fingerprint
    options = {"channels_last": True}
    assert render_fingerprint("a" * 64, versions, **base | {"options": options}) != fingerprint


def test_weights_replaced_in_place_are_new_weights(tmp_path: Path) -> None:
    from worker.pipeline import weight_files_identity, weights_index_sha256

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"a" * 64)
    os.utime(weights, (1_700_000_000, 1_700_000_000))
    identity, index = weight_files_identity(folder), weights_index_sha256(folder)
    # A copy that keeps times (rsync -a, image layers) is the same checkpoint on another host.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert weight_files_identity(copy) == identity
    # A fine-tune of the same shape written over it: same names and sizes, new weights.
    weights.write_bytes(b"b" * 64)
    os.utime(weights, (1_700_000_100, 1_700_000_100))
    assert weights_index_sha256(folder) == index  # the generation record cannot tell
    assert weight_files_identity(folder) != identity  # the cache can
    # A hub snapshot links each file to a blob named by its SHA-256.
    hub = tmp_path / "hub"
    (hub / "blobs").mkdir(parents=True)
    (hub / "snapshot" / "unet").mkdir(parents=True)
    for blob in ("1" * 64, "2" * 64):
        (hub / "blobs" / blob).write_bytes(b"c" * 64)
    link = hub / "snapshot" / "unet" / "diffusion_pytorch_model.safetensors"
    link.symlink_to(hub / "blobs" / ("1" * 64))
    first = weight_files_identity(hub / "snapshot")
    link.unlink()
    link.symlink_to(hub / "blobs" / ("2" * 64))
    assert weight_files_identity(hub / "snapshot") != first


def test_the_fleet_must_agree_on_one_fingerprint() -> None:
    one = {FINGERPRINT_FIELD: FINGERPRINT}
    assert fleet_fingerprint({"a": one, "b": dict(one)}) == FINGERPRINT
    assert fleet_fingerprint({"a": one, "b": {FINGERPRINT_FIELD: OTHER_FINGERPRINT}}) is None
    assert fleet_fingerprint({"a": one, "b": {}}) is None  # an older worker
    assert fleet_fingerprint({"a": {FINGERPRINT_FIELD: None}}) is None
    assert fleet_fingerprint({}) is None


def test_the_cached_price_is_a_fraction_rounded_up_to_a_millicredit() -> None:
    assert cached_price(UNIT_PRICE, Decimal("0")) == 0
    assert cached_price(UNIT_PRICE, Decimal("0.5")) == 6
    assert cached_price(1000, Decimal("0.5")) == 500
    assert cached_price(1000, Decimal("0.0001")) == 1
    assert cached_price(UNIT_PRICE, Decimal("1")) == UNIT_PRICE
    assert price_per_image(520, 512, 1, Decimal(1)) == UNIT_PRICE


# ------------------------------------------------------------------ storage copies


def test_a_local_copy_outlives_its_source_and_the_other_way_round(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "results")
    storage.put("1/a/0.png", b"original", "image/png")
    storage.copy("1/a/0.png", "1/b/0.png")
    assert storage.get("1/b/0.png") == b"original"
    storage.delete("1/a/0.png")
    assert storage.get("1/b/0.png") == b"original"
    storage.copy("1/b/0.png", "1/c/0.png")
    storage.put("1/b/0.png", b"replaced", "image/png")  # a put never changes a copy
    assert storage.get("1/c/0.png") == b"original"
    with pytest.raises(ObjectMissing):
        storage.copy("1/a/0.png", "1/d/0.png")
    assert not [p for p in (tmp_path / "results").rglob(".tmp-*")]
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.copy("1/b/0.png", "../escape.png")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_an_s3_copy_is_server_side_and_independent(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3").create_bucket(Bucket="cache-copies")
    storage = S3Storage("cache-copies", "farm")
    storage.put("1/a/0.png", b"original", "image/png")
    storage.copy("1/a/0.png", "1/b/0.png")
    storage.delete("1/a/0.png")
    assert storage.get("1/b/0.png") == b"original"
    head = boto3.client("s3").head_object(Bucket="cache-copies", Key="farm/1/b/0.png")
    assert head["ContentType"] == "image/png"
    with pytest.raises(ObjectMissing):
        storage.copy("1/a/0.png", "1/c/0.png")


# ------------------------------------------------------------------ lookups and submissions


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    built = make_storage(settings.resolved_storage_url)
    assert isinstance(built, LocalStorage)
    return built


@pytest.fixture
def worker_says(settings: Settings) -> Callable[..., None]:
    """Publish live workers' heartbeats naming render fingerprints, as workers do."""
    client = make_redis(settings.require_redis_url())

    def publish(*fingerprints: str | None) -> None:
        forget_worker(client, "w0")
        forget_worker(client, "w1")
        for number, fingerprint in enumerate(fingerprints):
            record_heartbeat(client, f"w{number}", {FINGERPRINT_FIELD: fingerprint}, ttl_s=600)

    publish(FINGERPRINT)
    return publish


@pytest.fixture
def make_client(settings: Settings) -> Iterator[Callable[..., FlaskClient]]:
    """A test client of an app whose settings differ from the fixture's by `overrides`."""
    apps: list[Flask] = []

    def build(**overrides: Any) -> FlaskClient:
        app = create_app(settings.model_copy(update=overrides))
        apps.append(app)
        return app.test_client()

    yield build
    for app in apps:
        app.extensions["kolors_farm"].engine.dispose()


def rendered(
    sessions: sessionmaker[Session],
    user: ApiUser,
    storage: LocalStorage,
    fields: dict[str, Any] | None = None,
    fingerprint: str = FINGERPRINT,
    retention: timedelta = timedelta(days=7),
) -> str:
    """A COMPLETED job whose images a worker stored and recorded with their cache keys."""
    params = KolorsParams.model_validate(fields or REQUEST)
    job = make_job(sessions, user, params, retention=retention)
    with transaction(sessions) as session:
        spec = claim_job(session, release_job(session, job.id), "w0", timedelta(minutes=1))
        assert spec is not None
    for index in range(params.number_of_images):
        seed = spec.image_seed(index)
        colour = (seed % 256, 40, 90)
        data, content_type = encode_image(
            Image.new("RGB", (8, 8), colour), params.output_format, params.output_quality
        )
        key = image_storage_key(user.principal.tenant_id, job.id, index, params.output_format)
        storage.put(key, data, content_type)
        with transaction(sessions) as session:
            record_image(
                session,
                job.id,
                spec.attempt,
                index,
                seed=seed,
                storage_key=key,
                content_type=content_type,
                size_bytes=len(data),
                generation={"parameters": {"seed": seed}},
                cache_key=cache_key(params, seed, fingerprint),
            )
    with transaction(sessions) as session:
        finish_job(session, job.id, spec.attempt)
    return job.id


def submit(client: FlaskClient, user: ApiUser, **fields: Any) -> str:
    response = client.post("/v2/kolors", json=REQUEST | fields, headers=user.headers)
    assert response.status_code == 202, response.get_json()
    request_id: str = response.get_json()["request_id"]
    return request_id


def job_row(sessions: sessionmaker[Session], job_id: str) -> Job:
    with read_only(sessions) as session:
        job = session.get_one(Job, job_id)
        _ = job.images
        return job


def image_bytes(client: FlaskClient, user: ApiUser, job_id: str, index: int) -> bytes:
    response = client.get(f"/v2/requests/{job_id}/images/{index}", headers=user.headers)
    assert response.status_code == 200, response.get_json()
    data: bytes = response.data
    return data


def assert_answered_from_cache(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    user: ApiUser,
    job_id: str,
    source: str,
    owner: ApiUser | None = None,
) -> None:
    """COMPLETED at submission, never dispatched, its images the source's bytes, cached."""
    owner = owner or user
    status = client.get(f"/v2/requests/{job_id}/status", headers=user.headers).get_json()
    assert status["status"] == "COMPLETED"
    result = client.get(f"/v2/requests/{job_id}", headers=user.headers).get_json()
    assert result["status"] == "COMPLETED"
    assert [output["cached"] for output in result["outputs"]] == [True] * len(result["outputs"])
    job = job_row(sessions, job_id)
    assert (job.attempt, job.worker, job.released_at) == (0, None, None)
    assert job.images_done == job.number_of_images == len(result["outputs"])
    original = job_row(sessions, source)
    assert result["seeds"] == [image.seed for image in original.images[: job.number_of_images]]
    for image in job.images:
        assert image.cached and image.cache_key is None  # copies are never a source
        assert image.storage_key.startswith(f"{user.principal.tenant_id}/{job_id}/")
        assert image_bytes(client, user, job_id, image.index) == image_bytes(
            client, owner, source, image.index
        )
    source_result = client.get(f"/v2/requests/{source}", headers=owner.headers).get_json()
    assert [output["cached"] for output in source_result["outputs"]] == [False] * len(
        source_result["outputs"]
    )


def test_an_identical_request_completes_at_once_free_by_default(
    client: FlaskClient,
    alice: ApiUser,
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    worker_says: Callable[..., None],
) -> None:
    source = rendered(sessions, alice, storage, REQUEST | {"number_of_images": 3})
    with read_only(sessions) as session:
        before = get_balance(session, alice.principal.user_id)
    # Images 0 and 1 of the original (seeds 1234 and 1235).
    job_id = submit(client, alice, number_of_images=2)
    assert_answered_from_cache(client, sessions, alice, job_id, source)
    with read_only(sessions) as session:
        assert get_balance(session, alice.principal.user_id) == before
        assert ledger_balance(session, alice.principal.user_id) == before
        entries = session.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id))
        assert list(entries) == []  # a free hit holds nothing and captures nothing
        assert job_row(sessions, job_id).price_per_image == 0
    history = client.get("/v2/requests", headers=alice.headers).get_json()["requests"]
    assert {entry["request_id"]: entry["cached"] for entry in history} == {
        job_id: True,
        source: False,
    }
    # The synchronous route answers from the cache too, with no worker anywhere.
    response = client.post("/v1/kolors", json=REQUEST, headers=alice.headers)
    assert response.status_code == 200
    assert response.data == image_bytes(client, alice, source, 0)
    # Seeds 1235..1237: image 3 was never rendered, so the whole request renders.
    partial = submit(client, alice, seed=1235, number_of_images=3)
    job = job_row(sessions, partial)
    assert job.state == JobState.QUEUED.value and job.images == []
    # A random seed resolves to a new one: rendered.
    assert job_row(sessions, submit(client, alice, seed=-1)).state == JobState.QUEUED.value


def test_a_priced_hit_holds_and_captures_exactly_its_fraction(
    make_client: Callable[..., FlaskClient],
    alice: ApiUser,
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    worker_says: Callable[..., None],
) -> None:
    client = make_client(cache_price_fraction=Decimal("0.5"))
    source = rendered(sessions, alice, storage, REQUEST | {"number_of_images": 2})
    with read_only(sessions) as session:
        before = get_balance(session, alice.principal.user_id)
    job_id = submit(client, alice, number_of_images=2)
    assert_answered_from_cache(client, sessions, alice, job_id, source)
    with read_only(sessions) as session:
        kinds = [
            (entry.kind, entry.available_delta, entry.held_delta)
            for entry in session.scalars(
                select(LedgerEntry).where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id)
            )
        ]
        assert kinds == [("hold", -12, 12), ("capture", 0, -6), ("capture", 0, -6)]
        assert held_for_job(session, job_id) == 0
        assert get_balance(session, alice.principal.user_id) == before - 12
        assert ledger_balance(session, alice.principal.user_id) == before - 12
    assert job_row(sessions, job_id).price_per_image == 6
    # Not enough credits for the cached price: 406, and nothing is left behind.
    poor = make_user(sessions, "poor", 11, tenant="alice")
    response = client.post(
        "/v2/kolors", json=REQUEST | {"number_of_images": 2}, headers=poor.headers
    )
    assert response.status_code == 406
    with read_only(sessions) as session:
        assert (
            session.scalars(select(Job.id).where(Job.user_id == poor.principal.user_id)).all() == []
        )
    # The refused request's copies were removed: only the source's and the hit's remain.
    tenant_dir = storage.root / str(alice.principal.tenant_id)
    assert {path.parent.name for path in tenant_dir.rglob("*.png")} == {source, job_id}


def test_scope_is_the_tenant_unless_widened_to_the_farm(
    client: FlaskClient,
    make_client: Callable[..., FlaskClient],
    alice: ApiUser,
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    worker_says: Callable[..., None],
) -> None:
    source = rendered(sessions, alice, storage)
    colleague = make_user(sessions, "alice-colleague", 10_000, tenant="alice")
    bob = make_user(sessions, "bob", 10_000)
    shared_tenant = submit(client, colleague)
    assert_answered_from_cache(client, sessions, colleague, shared_tenant, source)
    other_tenant = submit(client, bob)
    assert job_row(sessions, other_tenant).state == JobState.QUEUED.value
    farm_wide = make_client(cache_scope="farm")
    hit = submit(farm_wide, bob)
    assert_answered_from_cache(farm_wide, sessions, bob, hit, source, owner=alice)
    # Bob's copy is his own: under his tenant's keys, not a link to Alice's request.
    assert job_row(sessions, hit).tenant_id == bob.principal.tenant_id


def test_another_fingerprint_or_a_mixed_fleet_misses(
    client: FlaskClient,
    make_client: Callable[..., FlaskClient],
    alice: ApiUser,
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    worker_says: Callable[..., None],
) -> None:
    rendered(sessions, alice, storage)
    for fleet in ((OTHER_FINGERPRINT,), (FINGERPRINT, OTHER_FINGERPRINT), (FINGERPRINT, None), ()):
        worker_says(*fleet)
        assert job_row(sessions, submit(client, alice)).state == JobState.QUEUED.value, fleet
    worker_says(FINGERPRINT, FINGERPRINT)
    assert job_row(sessions, submit(client, alice)).state == JobState.COMPLETED.value
    off = make_client(cache=False)
    assert job_row(sessions, submit(off, alice)).state == JobState.QUEUED.value


def test_any_other_rendering_input_misses(
    client: FlaskClient,
    alice: ApiUser,
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    worker_says: Callable[..., None],
) -> None:
    rendered(sessions, alice, storage)
    for change in (
        {"output_format": "webp"},
        {"output_quality": 79},
        {"seed": 1233},
        {"prompt": "a lighthouse at night"},
    ):
        assert job_row(sessions, submit(client, alice, **change)).state == "QUEUED", change
    assert job_row(sessions, submit(client, alice)).state == JobState.COMPLETED.value


def test_expired_or_deleted_results_miss_and_a_copy_outlives_its_original(
    client: FlaskClient,
    alice: ApiUser,
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    settings: Settings,
    worker_says: Callable[..., None],
) -> None:
    from control.dispatcher import Dispatcher
    from shared.celery_app import make_celery

    dispatcher = Dispatcher(resources_for(settings, sessions, storage), make_celery(settings))
    source = rendered(sessions, alice, storage)
    copy = submit(client, alice)
    assert_answered_from_cache(client, sessions, alice, copy, source)
    original_bytes = image_bytes(client, alice, source, 0)
    # The original expires: it no longer answers, even before cleanup deletes it.
    expire(sessions, source)
    assert job_row(sessions, submit(client, alice)).state == JobState.QUEUED.value
    assert dispatcher.delete_expired_results() == [source]
    with pytest.raises(ObjectMissing):
        storage.get(job_row(sessions, source).images[0].storage_key)
    assert job_row(sessions, source).images[0].cache_key is None  # out of the index
    # The copy is still served, with the same bytes.
    assert image_bytes(client, alice, copy, 0) == original_bytes
    assert client.get(f"/v2/requests/{copy}", headers=alice.headers).status_code == 200
    # The other way round: a copy's deletion leaves its original a source.
    second = rendered(sessions, alice, storage)
    hit = submit(client, alice)
    assert_answered_from_cache(client, sessions, alice, hit, second)
    expire(sessions, hit)
    assert dispatcher.delete_expired_results() == [hit]
    assert image_bytes(client, alice, second, 0) == original_bytes
    assert_answered_from_cache(client, sessions, alice, submit(client, alice), second)
    # A source deleted between the lookup and the copy (cleanup meanwhile): rendered.
    storage.delete(job_row(sessions, second).images[0].storage_key)
    assert job_row(sessions, submit(client, alice)).state == JobState.QUEUED.value


def expire(sessions: sessionmaker[Session], job_id: str) -> None:
    with transaction(sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def statements_of(engine: Engine, action: Callable[[], object]) -> list[str]:
    """The SQL statements `action` sends through `engine`."""
    sent: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        action()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return sent


def test_a_miss_costs_one_indexed_statement(
    make_client: Callable[..., FlaskClient],
    alice: ApiUser,
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    database_url: str,
    worker_says: Callable[..., None],
) -> None:
    rendered(sessions, alice, storage)
    on, off = make_client(), make_client(cache=False)

    def engine_of(client: FlaskClient) -> Engine:
        engine: Engine = client.application.extensions["kolors_farm"].engine
        return engine

    def miss(client: FlaskClient) -> list[str]:
        return statements_of(engine_of(client), lambda: submit(client, alice, seed=7))

    def lookups(statements: list[str]) -> list[str]:
        return [s for s in statements if "cache_key IN" in s.replace("job_images.", "")]

    for client in (on, off):  # a key's first use of the minute is recorded: not counted below
        assert client.get("/v1/get-user-credits", headers=alice.headers).status_code == 200
    with_cache, without = miss(on), miss(off)
    # The one extra statement is the lookup (SQLite also begins its read transaction).
    extra = [s for s in with_cache if not s.startswith("BEGIN")]
    assert len(extra) - len([s for s in without if not s.startswith("BEGIN")]) == 1
    assert len(lookups(with_cache)) == 1 and lookups(without) == []
    random_seed = statements_of(engine_of(on), lambda: submit(on, alice, seed=-1))
    assert lookups(random_seed) == []
    if not database_url.startswith("sqlite"):
        return
    # The lookup reads the partial index on the keys, and each key's job by its primary key.
    params = KolorsParams.model_validate(REQUEST | {"number_of_images": 3})
    keys = image_cache_keys(params, 1234, FINGERPRINT)
    engine = make_engine(database_url)
    try:
        with read_only(make_sessions(engine)) as session:
            plan = explain(session, keys, alice.principal.tenant_id)
    finally:
        engine.dispose()
    assert "ix_job_images_cache_key" in plan, plan
    assert "SCAN" not in plan, plan


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    from shared.db import make_session_factory

    return make_session_factory(engine)


def explain(session: Session, keys: list[str], tenant_id: int) -> str:
    """SQLite's plan of the cache lookup, captured from the statement the function sends."""
    sent: list[tuple[str, Any]] = []
    connection = session.connection()

    def grab(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(connection, "before_cursor_execute", grab)
    try:
        assert list(find_cached_images(session, keys, tenant_id)) == keys[:1]  # a partial hit
    finally:
        event.remove(connection, "before_cursor_execute", grab)
    statement, parameters = sent[-1]
    rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
    return "\n".join(str(row[-1]) for row in rows)


# ------------------------------------------------------------------ a real farm, end to end


@pytest.fixture(scope="module")
def farm(module_farms: FarmFactory) -> RunningFarm:
    # SQLite: the SQL rules run on both databases above; this checks that a real worker
    # publishes its fingerprint and keys its images, which no database changes, and one
    # farm is all the test budget allows.
    return module_farms.start("cache", workers=["cache-worker"])


def test_a_real_farm_renders_once_then_answers_from_storage(farm: RunningFarm) -> None:
    key = farm.processes.create_user("carol", "100")
    headers = {"x-api-key": key}
    body = REQUEST | {"width": 512, "height": 512, "steps": 2, "number_of_images": 2}

    def finished(request_id: str) -> dict[str, Any] | None:
        status = httpx.get(f"{farm.url}/v2/requests/{request_id}/status", headers=headers)
        answer: dict[str, Any] = status.json()
        return answer if answer["status"] in ("COMPLETED", "FAILED") else None

    first = httpx.post(f"{farm.url}/v2/kolors", json=body, headers=headers).json()["request_id"]
    assert wait_for(lambda: finished(first), 120, "the first render")["status"] == "COMPLETED"
    rendered_before = farm.processes.log("cache-worker").count("rendering")
    second = httpx.post(f"{farm.url}/v2/kolors", json=body, headers=headers).json()["request_id"]
    status = httpx.get(f"{farm.url}/v2/requests/{second}/status", headers=headers).json()
    assert status["status"] == "COMPLETED"  # at submission: no dispatch, no worker
    result = httpx.get(f"{farm.url}/v2/requests/{second}", headers=headers).json()
    assert [output["cached"] for output in result["outputs"]] == [True, True]
    assert result["seeds"] == [1234, 1235]
    for index in range(2):
        original = httpx.get(f"{farm.url}/v2/requests/{first}/images/{index}", headers=headers)
        cached = httpx.get(f"{farm.url}/v2/requests/{second}/images/{index}", headers=headers)
        assert original.status_code == cached.status_code == 200
        assert cached.content == original.content
        assert Image.open(io.BytesIO(cached.content)).format == "PNG"
    log = farm.processes.log("cache-worker")
    assert second not in log and log.count("rendering") == rendered_before
    # The worker keyed its images with the fingerprint it publishes.
    workers = live_workers(make_redis(farm.processes.env["KOLORS_FARM_REDIS_URL"]))
    fingerprint = fleet_fingerprint(workers)
    assert fingerprint is not None
    params = KolorsParams.model_validate(body)
    engine = make_engine(farm.processes.env["KOLORS_FARM_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(JobImage.job_id, JobImage.cache_key, JobImage.cached)
                .where(JobImage.job_id.in_([first, second]))
                .order_by(JobImage.job_id == second, JobImage.index)
            ).all()
    finally:
        engine.dispose()
    expected = image_cache_keys(params, 1234, fingerprint)
    assert [(row.cache_key, row.cached) for row in rows if row.job_id == first] == [
        (expected[0], False),
        (expected[1], False),
    ]
    assert [(row.cache_key, row.cached) for row in rows if row.job_id == second] == [
        (None, True),
        (None, True),
    ]
