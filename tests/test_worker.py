"""The render path in-process: the real KolorsPipeline (tiny checkpoint), DB, Redis, disk."""

from __future__ import annotations

import io
import threading
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.accounts.ledger import get_balance, ledger_balance
from shared.db import transaction
from shared.jobs.events import read_progress, request_cancel
from shared.jobs.params import KolorsParams
from shared.jobs.transitions import DEADLINE_ERROR, submit_job
from shared.models import Job, JobImage, LedgerEntry
from shared.redis_client import make_redis
from shared.settings import Settings
from shared.storage import LocalStorage
from tests.conftest import ApiUser, release_job
from worker.context import WorkerContext
from worker.outcome import STORE_UNREACHABLE
from worker.pipeline import KolorsRenderer
from worker.render import run_render_job


@pytest.fixture
def context(
    settings: Settings, sessions: sessionmaker[Session], renderer: KolorsRenderer, tmp_path: Path
) -> WorkerContext:
    return WorkerContext(
        name="test-worker",
        settings=settings,
        sessions=sessions,
        redis=make_redis(settings.require_redis_url()),
        storage=LocalStorage(tmp_path / "results"),
        renderer=renderer,
    )


def queue(
    context: WorkerContext, user: ApiUser, *, deadline: timedelta | None = None, **params: object
) -> str:
    """Submit a small job (512x512, 4 steps unless overridden); its id."""
    fields = {"prompt": "a fox", "width": 512, "height": 512, "steps": 4, **params}
    with transaction(context.sessions) as session:
        job = submit_job(
            session,
            user.principal,
            KolorsParams.model_validate(fields),
            Decimal(1),
            deadline=deadline,
        )
        return release_job(session, job.id)


def render(context: WorkerContext, user: ApiUser, **params: object) -> Job:
    job_id = queue(context, user, deadline=None, **params)
    run_render_job(context, job_id)
    with transaction(context.sessions) as session:
        job = session.get_one(Job, job_id)
        _ = job.images
        return job


def image_bytes(context: WorkerContext, job: Job, index: int = 0) -> bytes:
    return context.storage.get(job.images[index].storage_key)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def test_renders_stores_records_and_charges(context: WorkerContext, alice: ApiUser) -> None:
    job = render(context, alice, number_of_images=2, output_format="png")
    assert job.state == "COMPLETED" and job.attempt == 1
    assert [image.index for image in job.images] == [0, 1]
    assert [image.seed for image in job.images] == [441234134, 441234135]
    for image in job.images:
        decoded = Image.open(io.BytesIO(context.storage.get(image.storage_key)))
        assert decoded.format == "PNG" and decoded.size == (512, 512)
        assert image.storage_key == f"{alice.principal.tenant_id}/{job.id}/{image.index}.png"
    with transaction(context.sessions) as session:
        # 512x512 at 4 steps: ceil(1000 * 0.25 * 4 / 25) = 40 millicredits an image.
        assert get_balance(session, alice.principal.user_id) == 10_000 - 80
        assert ledger_balance(session, alice.principal.user_id) == 10_000 - 80
    progress = read_progress(context.redis, job.id)
    assert progress is not None and progress.step == progress.steps == 4
    assert progress.images_done == 1  # written before the last image was recorded


def test_same_seed_same_image_other_seed_other_image(
    context: WorkerContext, alice: ApiUser
) -> None:
    first = image_bytes(context, render(context, alice, seed=7, output_format="png"))
    again = image_bytes(context, render(context, alice, seed=7, output_format="png"))
    other = image_bytes(context, render(context, alice, seed=8, output_format="png"))
    assert first == again
    assert np.abs(pixels(first) - pixels(other)).mean() > 5


def test_image_i_reproduces_alone_with_seed_plus_i(context: WorkerContext, alice: ApiUser) -> None:
    batch = render(context, alice, seed=100, number_of_images=3, output_format="png")
    alone = render(context, alice, seed=102, output_format="png")
    assert image_bytes(context, batch, 2) == image_bytes(context, alone)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("prompt", "一只红色的狐狸"),
        ("negative_prompt", "blurry"),
        ("cfg", 2.0),
        ("steps", 6),
        ("scheduler", "DDIMScheduler"),
    ],
)
def test_each_parameter_reaches_the_pipeline(
    context: WorkerContext, alice: ApiUser, name: str, value: object
) -> None:
    base = pixels(image_bytes(context, render(context, alice, seed=3, output_format="png")))
    changed = pixels(
        image_bytes(context, render(context, alice, seed=3, output_format="png", **{name: value}))
    )
    assert np.abs(base - changed).mean() > 0.1


def test_size_format_and_quality_reach_the_encoder(context: WorkerContext, alice: ApiUser) -> None:
    wide = render(context, alice, width=768, height=512, output_format="jpeg", output_quality=95)
    low = render(context, alice, width=768, height=512, output_format="jpeg", output_quality=20)
    webp = render(context, alice, output_format="webp")
    decoded = Image.open(io.BytesIO(image_bytes(context, wide)))
    assert decoded.format == "JPEG" and decoded.size == (768, 512)
    assert len(image_bytes(context, low)) < len(image_bytes(context, wide))
    assert Image.open(io.BytesIO(image_bytes(context, webp))).format == "WEBP"
    assert webp.images[0].content_type == "image/webp"


def test_random_seed_is_resolved_and_reported(context: WorkerContext, alice: ApiUser) -> None:
    job = render(context, alice, seed=-1)
    assert 0 <= job.seed < 2**32
    assert job.images[0].seed == job.seed


def test_storage_failure_fails_the_job_and_releases_credits(
    context: WorkerContext, alice: ApiUser, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the results folder should be")
    context.storage = LocalStorage(blocker)
    context.settings = context.settings.model_copy(update={"store_retry_s": 0.0})  # no retry
    job = render(context, alice, number_of_images=2)
    assert job.state == "FAILED"
    assert job.error == STORE_UNREACHABLE
    assert job.images == []
    with transaction(context.sessions) as session:
        assert get_balance(session, alice.principal.user_id) == 10_000
        assert ledger_balance(session, alice.principal.user_id) == 10_000


def test_cancel_mid_render_stops_and_charges_only_delivered(
    context: WorkerContext, alice: ApiUser
) -> None:
    job_id = queue(context, alice, number_of_images=3)
    calls = 0
    original = context.renderer.render

    def render_then_cancel(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:  # a cancel arrives while the second image renders
            with transaction(context.sessions) as session:
                session.get_one(Job, job_id).cancel_requested = True
            request_cancel(context.redis, job_id)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    context.renderer.render = render_then_cancel  # type: ignore[method-assign,assignment]
    try:
        run_render_job(context, job_id)
    finally:
        del context.renderer.render
    with transaction(context.sessions) as session:
        done = session.get_one(Job, job_id)
        assert done.state == "CANCELLED"
        assert list(session.scalars(select(JobImage.index).where(JobImage.job_id == job_id))) == [0]
        assert get_balance(session, alice.principal.user_id) == 10_000 - 40
    assert calls == 2


def test_a_message_for_a_finished_job_does_nothing(context: WorkerContext, alice: ApiUser) -> None:
    job = render(context, alice)
    run_render_job(context, job.id)  # a redelivered message
    with transaction(context.sessions) as session:
        again = session.get_one(Job, job.id)
        assert again.attempt == 1 and again.images_done == 1
        assert get_balance(session, alice.principal.user_id) == 10_000 - 40


def test_a_passed_deadline_stops_the_render_and_refunds(
    context: WorkerContext, alice: ApiUser
) -> None:
    job_id = queue(context, alice, deadline=timedelta(milliseconds=1), number_of_images=2)
    time.sleep(0.01)
    run_render_job(context, job_id)
    with transaction(context.sessions) as session:
        done = session.get_one(Job, job_id)
        assert (done.state, done.error, done.images_done) == ("CANCELLED", DEADLINE_ERROR, 0)
        assert get_balance(session, alice.principal.user_id) == 10_000
        assert ledger_balance(session, alice.principal.user_id) == 10_000


def test_a_worker_that_loses_its_lease_stops_and_writes_nothing_more(
    context: WorkerContext, alice: ApiUser
) -> None:
    # Renewals every 0.1 s; a second attempt takes the job while the first renders.
    context.settings = context.settings.model_copy(update={"lease_s": 0.3})
    job_id = queue(context, alice, steps=8, number_of_images=6)

    def take_over_once_running() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with transaction(context.sessions) as session:
                taken = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == "RUNNING", Job.images_done >= 1)
                    .values(attempt=Job.attempt + 1, worker="another")
                    .returning(Job.id)
                ).first()
            if taken:
                return
            time.sleep(0.01)

    thief = threading.Thread(target=take_over_once_running)
    thief.start()
    run_render_job(context, job_id)
    thief.join()
    with transaction(context.sessions) as session:
        after = session.get_one(Job, job_id)
        # Still RUNNING under attempt 2: attempt 1 neither finished nor failed it.
        assert (after.state, after.attempt, after.worker) == ("RUNNING", 2, "another")
        delivered = list(session.scalars(select(JobImage.attempt).where(JobImage.job_id == job_id)))
        assert set(delivered) == {1} and 1 <= len(delivered) < 6
        assert after.images_done == len(delivered)
        captures = session.scalar(
            select(func.count()).where(LedgerEntry.job_id == job_id, LedgerEntry.kind == "capture")
        )
        assert captures == len(delivered)


def test_out_of_memory_fails_only_that_job_and_the_worker_goes_on(
    context: WorkerContext, alice: ApiUser
) -> None:
    original = context.renderer.render

    def out_of_memory(*args: object, **kwargs: object) -> object:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    context.renderer.render = out_of_memory  # type: ignore[method-assign,assignment]
    try:
        failed = render(context, alice, number_of_images=2)
    finally:
        context.renderer.render = original  # type: ignore[method-assign]
    assert failed.state == "FAILED" and failed.images == []
    assert failed.error is not None and "Out of GPU memory" in failed.error
    following = render(context, alice)
    assert following.state == "COMPLETED" and len(following.images) == 1
    with transaction(context.sessions) as session:
        assert get_balance(session, alice.principal.user_id) == 10_000 - 40
        assert ledger_balance(session, alice.principal.user_id) == 10_000 - 40
