"""Results: S3 storage over real HTTP, signed expiring links, retention, metadata, full disks.

The S3 tests talk to moto's S3 server over real HTTP. moto does not verify
request signatures or presigned-URL expiry, so those rules are tested on the
local-disk links the API signs itself.
"""

from __future__ import annotations

import io
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from control.processes import free_port
from shared.accounts.ledger import get_balance, ledger_balance
from shared.db import transaction
from shared.errors import ExpiredLink, InvalidLink
from shared.jobs.imaging import read_generation_record
from shared.jobs.transitions import claim_job, finish_job, reclaim_claims_of, record_image
from shared.links import (
    KEY_FILE,
    ImageLink,
    sign_image_link,
    signing_key,
    verify_image_link,
)
from shared.models import Job, JobImage
from shared.redis_client import make_redis
from shared.settings import Settings
from shared.storage import LocalStorage, ObjectMissing, S3Storage, make_storage
from tests.conftest import ApiUser, make_job, make_user, release_job, resources_for
from tests.farms import FarmFactory
from worker.context import WorkerContext
from worker.pipeline import KolorsRenderer
from worker.render import run_render_job

BUCKET = "results"


# --- signed links ----------------------------------------------------------------------------


def test_a_link_verifies_until_it_expires() -> None:
    link = ImageLink(tenant_id=3, job_id="abc", index=1, expires_at=2_000_000_000)
    token = sign_image_link("k", link)
    assert verify_image_link("k", token, datetime.fromtimestamp(1_999_999_999, UTC)) == link
    with pytest.raises(ExpiredLink):
        verify_image_link("k", token, datetime.fromtimestamp(2_000_000_000, UTC))


def test_a_tampered_or_retargeted_link_is_refused() -> None:
    token = sign_image_link("k", ImageLink(3, "abc", 1, 2_000_000_000))
    other = sign_image_link("k", ImageLink(3, "xyz", 1, 2_000_000_000))
    payload, signature = token.rsplit(".", 1)
    other_payload, _ = other.rsplit(".", 1)
    now = datetime.fromtimestamp(1_000_000_000, UTC)
    for forged in (
        f"{other_payload}.{signature}",  # another job's payload under this signature
        payload + "." + ("B" if signature[0] != "B" else "C") + signature[1:],
        sign_image_link("another key", ImageLink(3, "abc", 1, 2_000_000_000)),
        "not-a-token",
    ):
        with pytest.raises(InvalidLink):
            verify_image_link("k", forged, now)


def test_the_signing_key_is_generated_once_and_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    key = signing_key(settings)
    assert len(key) >= 32 and signing_key(settings) == key
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    configured = Settings(data_dir=tmp_path, url_signing_key="configured-secret")
    assert signing_key(configured) == "configured-secret"


# --- API: links, retention, 410 --------------------------------------------------------------


def delivered_job(
    sessions: sessionmaker[Session],
    user: ApiUser,
    storage: LocalStorage,
    retention: timedelta = timedelta(days=7),
) -> str:
    """A COMPLETED job with one stored image, made through the domain functions."""
    job = make_job(sessions, user, width=512, height=512, retention=retention)
    with transaction(sessions) as session:
        spec = claim_job(session, release_job(session, job.id), "w", timedelta(minutes=1))
        assert spec is not None
    key = f"{user.principal.tenant_id}/{job.id}/0.webp"
    storage.put(key, b"image-bytes", "image/webp")
    with transaction(sessions) as session:
        record_image(
            session,
            job.id,
            1,
            0,
            seed=spec.seed,
            storage_key=key,
            content_type="image/webp",
            size_bytes=11,
            generation={"parameters": {"prompt": "x"}},
        )
        finish_job(session, job.id, 1)
    return job.id


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    built = make_storage(settings.resolved_storage_url)
    assert isinstance(built, LocalStorage)
    return built


def test_result_links_serve_the_image_without_a_key_until_they_expire(
    client: FlaskClient,
    alice: ApiUser,
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    settings: Settings,
) -> None:
    job_id = delivered_job(sessions, alice, storage)
    body = client.get(f"/v2/requests/{job_id}", headers=alice.headers).get_json()
    url = body["output"][0]
    assert url.startswith("http://localhost/v2/results/")
    expires = datetime.fromisoformat(body["outputs"][0]["expires_at"])
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    assert body["outputs"][0]["generation"] == {"parameters": {"prompt": "x"}}
    path = url.removeprefix("http://localhost")
    fetched = client.get(path)  # no API key: the link is the credential
    assert fetched.status_code == 200 and fetched.data == b"image-bytes"
    # Change the signature's first character: the last one of a base64 HMAC-SHA1 carries
    # two padding bits, so some edits there decode to the same bytes.
    payload, signature = path.rsplit(".", 1)
    swapped = ("B" if signature[0] != "B" else "C") + signature[1:]
    tampered = client.get(f"{payload}.{swapped}")
    assert tampered.status_code == 403 and "error" in tampered.get_json()
    key = signing_key(settings)
    past = int((datetime.now(UTC) - timedelta(seconds=1)).timestamp())
    expired = sign_image_link(key, ImageLink(alice.principal.tenant_id, job_id, 0, past))
    response = client.get(f"/v2/results/{expired}")
    assert response.status_code == 403 and "expired" in response.get_json()["error"]


def test_a_link_signed_for_another_tenant_is_refused(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session], storage: LocalStorage,
    settings: Settings,
) -> None:  # fmt: skip
    job_id = delivered_job(sessions, alice, storage)
    mallory = make_user(sessions, "mallory", 10_000)
    future = int((datetime.now(UTC) + timedelta(hours=1)).timestamp())
    token = sign_image_link(
        signing_key(settings), ImageLink(mallory.principal.tenant_id, job_id, 0, future)
    )
    assert client.get(f"/v2/results/{token}").status_code == 403


def test_expired_results_answer_410_and_cleanup_deletes_them(
    client: FlaskClient,
    alice: ApiUser,
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    settings: Settings,
) -> None:
    from control.dispatcher import Dispatcher
    from shared.celery_app import make_celery

    job_id = delivered_job(sessions, alice, storage)
    kept = delivered_job(sessions, alice, storage)
    link = client.get(f"/v2/requests/{job_id}", headers=alice.headers).get_json()["output"][0]
    with transaction(sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    for path in (
        f"/v2/requests/{job_id}",
        f"/v2/requests/{job_id}/images/0",
        link.removeprefix("http://localhost"),
    ):
        response = client.get(path, headers=alice.headers)
        assert response.status_code == 410, path
        assert "expired" in response.get_json()["error"]
    dispatcher = Dispatcher(resources_for(settings, sessions, storage), make_celery(settings))
    assert dispatcher.delete_expired_results() == [job_id]
    assert dispatcher.delete_expired_results() == []  # done once
    with pytest.raises(ObjectMissing):
        storage.get(f"{alice.principal.tenant_id}/{job_id}/0.webp")
    assert storage.get(f"{alice.principal.tenant_id}/{kept}/0.webp") == b"image-bytes"
    with transaction(sessions) as session:
        assert session.get_one(Job, job_id).results_deleted_at is not None
    assert client.get(f"/v2/requests/{job_id}", headers=alice.headers).status_code == 410
    assert client.get(f"/v2/requests/{kept}", headers=alice.headers).status_code == 200


def test_retention_header_within_bounds(
    client: FlaskClient, alice: ApiUser, sessions: sessionmaker[Session]
) -> None:
    for bad in ("60", "3599", str(31 * 24 * 3600), "forever"):
        response = client.post(
            "/v2/kolors", json={"prompt": "x"}, headers=alice.headers | {"X-Retention-Seconds": bad}
        )
        assert response.status_code == 400, bad
        assert response.get_json()["errors"][0]["field"] == "X-Retention-Seconds"
    response = client.post(
        "/v2/kolors", json={"prompt": "x"}, headers=alice.headers | {"X-Retention-Seconds": "7200"}
    )
    assert response.status_code == 202
    default = client.post("/v2/kolors", json={"prompt": "x"}, headers=alice.headers)
    with transaction(sessions) as session:
        for job_id, seconds in (
            (response.get_json()["request_id"], 7200),
            (default.get_json()["request_id"], 7 * 24 * 3600),
        ):
            job = session.get_one(Job, job_id)
            assert job.expires_at is not None
            assert abs((job.expires_at - job.created_at).total_seconds() - seconds) < 1


# --- S3 over real HTTP (moto's server) ---------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Standard AWS variables pointing boto3 at the local S3 server, and a fresh bucket."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []) if _has_bucket() else []:
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    if not _has_bucket():
        client.create_bucket(Bucket=BUCKET)
    return s3_endpoint


def _has_bucket() -> bool:
    names = [b["Name"] for b in boto3.client("s3").list_buckets().get("Buckets", [])]
    return BUCKET in names


def test_s3_storage_round_trip_with_deterministic_keys(s3_env: str) -> None:
    storage = make_storage(f"s3://{BUCKET}/farm/results")
    assert isinstance(storage, S3Storage)
    storage.put("1/job/0.webp", b"first", "image/webp")
    storage.put("1/job/0.webp", b"second", "image/webp")  # a redelivered upload
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]
    assert [obj["Key"] for obj in listed] == ["farm/results/1/job/0.webp"]
    assert storage.get("1/job/0.webp") == b"second"
    head = boto3.client("s3").head_object(Bucket=BUCKET, Key="farm/results/1/job/0.webp")
    assert head["ContentType"] == "image/webp"
    url = storage.presigned_url("1/job/0.webp", 600)
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
    assert httpx.get(url).content == b"second"
    storage.delete("1/job/0.webp")
    with pytest.raises(ObjectMissing):
        storage.get("1/job/0.webp")


def test_s3_rejects_keys_that_escape_the_prefix(s3_env: str) -> None:
    storage = S3Storage(BUCKET, "farm")
    for key in ("../other", "/abs", ""):
        with pytest.raises(ValueError, match="invalid storage key"):
            storage.put(key, b"x", "image/png")


# --- the render path: uploads, failures, metadata --------------------------------------------


def worker_context(
    settings: Settings, sessions: sessionmaker[Session], renderer: KolorsRenderer, storage: Any
) -> WorkerContext:
    return WorkerContext(
        name="results-worker",
        # A failing store fails the job at once (the retries have a test of their own).
        settings=settings.model_copy(update={"store_retry_s": 0.0}),
        sessions=sessions,
        redis=make_redis(settings.require_redis_url()),
        storage=storage,
        renderer=renderer,
    )


def render(context: WorkerContext, user: ApiUser, **params: Any) -> Job:
    fields = {"prompt": "a fox", "width": 512, "height": 512, "steps": 3, **params}
    job = make_job(context.sessions, user, release=True, **fields)
    run_render_job(context, job.id)
    with transaction(context.sessions) as session:
        done = session.get_one(Job, job.id)
        _ = done.images
        return done


def test_the_worker_uploads_to_s3_and_a_failed_upload_releases_credits(
    s3_env: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    renderer: KolorsRenderer,
    alice: ApiUser,
) -> None:
    context = worker_context(settings, sessions, renderer, S3Storage(BUCKET, "farm"))
    job = render(context, alice, number_of_images=2)
    assert job.state == "COMPLETED"
    keys = sorted(
        obj["Key"] for obj in boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]
    )
    assert keys == [f"farm/{image.storage_key}" for image in job.images]
    context.storage = S3Storage("no-such-bucket", "farm")
    failed = render(context, alice, number_of_images=2)
    assert failed.state == "FAILED" and failed.images == []
    with transaction(sessions) as session:
        spent = 2 * 30  # the completed job's two 512x512, 3-step images
        assert get_balance(session, alice.principal.user_id) == 10_000 - spent
        assert ledger_balance(session, alice.principal.user_id) == 10_000 - spent


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_generation_record_round_trips_and_reproduces_the_image(
    settings: Settings,
    sessions: sessionmaker[Session],
    renderer: KolorsRenderer,
    alice: ApiUser,
    tmp_path: Path,
    output_format: str,
) -> None:
    context = worker_context(settings, sessions, renderer, LocalStorage(tmp_path / "results"))
    job = render(
        context, alice, prompt="一只熊猫 in the snow", seed=11, number_of_images=2,
        output_format=output_format, negative_prompt="blurry", cfg=4.5,
    )  # fmt: skip
    second = job.images[1]
    data = context.storage.get(second.storage_key)
    record = read_generation_record(data)
    assert record is not None and record == second.generation
    assert record["parameters"] | {"number_of_images": 1} == {
        "prompt": "一只熊猫 in the snow",
        "negative_prompt": "blurry",
        "cfg": 4.5,
        "seed": 12,
        "steps": 3,
        "width": 512,
        "height": 512,
        "scheduler": "EulerDiscreteScheduler",
        "output_format": output_format,
        "output_quality": 80,
        "number_of_images": 1,
    }
    assert record["model"] == renderer.model_id and len(record["weights_sha256"]) == 64
    assert set(record["versions"]) == {"kolors-farm", "torch", "diffusers", "transformers"}
    again = render(context, alice, **record["parameters"])  # the record, resubmitted as is
    assert context.storage.get(again.images[0].storage_key) == data
    assert Image.open(io.BytesIO(data)).format == {"jpeg": "JPEG"}.get(
        output_format, output_format.upper()
    )


class FlakyStorage(LocalStorage):
    """Local files whose first `failures` puts fail, as a store that is briefly away."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures
        self.puts = 0

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.puts += 1
        if self.puts <= self.failures:
            raise ConnectionError("the store is away")
        super().put(key, data, content_type)


def test_a_store_that_fails_a_while_is_retried_and_the_job_completes(
    settings: Settings,
    sessions: sessionmaker[Session],
    renderer: KolorsRenderer,
    alice: ApiUser,
    tmp_path: Path,
) -> None:
    storage = FlakyStorage(tmp_path / "results", failures=2)
    context = worker_context(settings, sessions, renderer, storage)
    context.settings = context.settings.model_copy(update={"store_retry_s": 30.0})
    job = render(context, alice, number_of_images=1)
    assert (job.state, len(job.images)) == ("COMPLETED", 1)
    assert storage.puts == 3
    assert storage.get(job.images[0].storage_key)[:4] == b"RIFF"  # webp, stored once it worked


class ClaimLostDuringAnOutage(LocalStorage):
    """Local files whose first put fails while the dispatcher gives the job's claim back."""

    def __init__(self, root: Path, sessions: sessionmaker[Session], worker: str) -> None:
        super().__init__(root)
        self.sessions = sessions
        self.worker = worker
        self.puts = 0

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.puts += 1
        if self.puts == 1:
            with transaction(self.sessions) as session:
                reclaim_claims_of(session, [self.worker], max_attempts=3)
            raise ConnectionError("the store is away")
        super().put(key, data, content_type)


def test_an_attempt_that_lost_its_claim_while_retrying_a_store_stores_nothing(
    settings: Settings,
    sessions: sessionmaker[Session],
    renderer: KolorsRenderer,
    alice: ApiUser,
    tmp_path: Path,
) -> None:
    storage = ClaimLostDuringAnOutage(tmp_path / "results", sessions, "results-worker")
    context = worker_context(settings, sessions, renderer, storage)
    context.settings = context.settings.model_copy(update={"store_retry_s": 30.0})
    job = render(context, alice, number_of_images=1)
    # Requeued for another attempt: this one's retry asked first and uploaded nothing.
    assert (job.state, job.images) == ("QUEUED", [])
    assert storage.puts == 1
    assert [path for path in (tmp_path / "results").rglob("*") if path.is_file()] == []


@pytest.fixture
def full_disk() -> Iterator[Path]:
    """A 64 KiB tmpfs: writes of a real image fail with ENOSPC part way through."""
    mount_point = Path(tempfile.mkdtemp(prefix="kolors-farm-full-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
        mount_point.rmdir()


def test_a_full_disk_fails_the_job_releases_credits_and_leaves_no_partial_file(
    settings: Settings,
    sessions: sessionmaker[Session],
    renderer: KolorsRenderer,
    alice: ApiUser,
    client: FlaskClient,
    full_disk: Path,
) -> None:
    context = worker_context(settings, sessions, renderer, LocalStorage(full_disk))
    job = render(context, alice, width=1024, height=1024, output_format="png")
    assert job.state == "FAILED" and job.images == []
    assert [p for p in full_disk.rglob("*") if p.is_file()] == []  # no partial object
    with transaction(sessions) as session:
        assert get_balance(session, alice.principal.user_id) == 10_000
        assert session.scalars(select(JobImage).where(JobImage.job_id == job.id)).all() == []
    status = client.get(f"/v2/requests/{job.id}/status", headers=alice.headers)
    assert status.status_code == 422 and status.get_json()["status"] == "FAILED"
    assert client.get("/healthz").status_code == 200


@pytest.mark.e2e
def test_the_farm_serves_results_from_s3_through_presigned_links(
    s3_env: str, farms: FarmFactory
) -> None:
    from tests.processes import wait_for

    running = farms.start(
        "s3",
        workers=["w0"],
        settings={"storage_url": f"s3://{BUCKET}/e2e", "dispatch_interval_s": "0.5"},
    )
    farm, api = running.processes, running.url
    key = farm.create_user("ann", "10")
    headers = {"x-api-key": key}
    submitted = httpx.post(
        f"{api}/v2/kolors",
        json={"prompt": "a fox", "width": 512, "height": 512, "steps": 2},
        headers=headers,
    ).json()
    status_url = submitted["status_url"]
    wait_for(
        lambda: httpx.get(status_url, headers=headers).json()["status"] == "COMPLETED",
        60,
        "the job to complete",
    )
    result = httpx.get(submitted["response_url"], headers=headers).json()
    url = result["output"][0]
    assert url.startswith(s3_env) and "X-Amz-Expires=" in url
    image = httpx.get(url)
    assert image.status_code == 200
    assert read_generation_record(image.content) == result["outputs"][0]["generation"]


def test_a_failing_cleanup_does_not_stop_dispatching(
    alice: ApiUser, sessions: sessionmaker[Session], storage: LocalStorage, settings: Settings
) -> None:
    from control.dispatcher import Dispatcher
    from shared.celery_app import make_celery

    job_id = delivered_job(sessions, alice, storage)
    with transaction(sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    path = storage.root / f"{alice.principal.tenant_id}/{job_id}/0.webp"
    path.unlink()
    path.mkdir()  # a directory where the image was: deleting it fails
    queued = queue_job(sessions, alice)
    dispatcher = Dispatcher(resources_for(settings, sessions, storage), make_celery(settings))
    report = dispatcher.run_pass()
    assert report.released == [queued] and report.deleted == []
    with transaction(sessions) as session:
        assert session.get_one(Job, job_id).results_deleted_at is None  # retried next time


def queue_job(sessions: sessionmaker[Session], user: ApiUser) -> str:
    return make_job(sessions, user).id
