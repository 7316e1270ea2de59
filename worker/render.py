"""The render thread: claim a job, render its pending images, hand them to post-processing.

The Celery task runs `start_render_job`: it claims the job under a lease (one short
transaction), renders its pending images in memory-sized calls with no database
connection open, and queues each finished image on the post-processing thread
(`worker.post`), which stores, records and ends the job while the next image, or the
next job, renders. The task returns once the job is rendered, before it settles;
`JobRun.wait` waits for the settlement.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import torch
from sqlalchemy.orm import Session

from shared.jobs.transitions import RenderSpec, claim_job
from worker.context import WorkerContext
from worker.memory import MIB, MemoryModel, plan_chunks
from worker.outcome import OUT_OF_MEMORY, RENDER_FAILED, Fail, Finish, LeftToRecovery, RenderEnd
from worker.post import RenderedImage, RenderEnded
from worker.retry import with_db_retry
from worker.run import JobRun

log = logging.getLogger(__name__)


def start_render_job(context: WorkerContext, job_id: str) -> JobRun | None:
    """Claim and render a job, queueing its images; returns once rendered, before it settles.

    The post-processing thread stores, records and ends the job (`JobRun.wait`); None if
    the job is not claimable (a message for a job that is not released is a no-op).
    """
    lease = timedelta(seconds=context.settings.lease_s)
    claimed = with_db_retry(context, lambda session: _claim(session, job_id, context.name, lease))
    if claimed is None:
        log.info("job %s is not claimable (already taken, finished or cancelled); skipping", job_id)
        return None
    spec = claimed
    log.info(
        "job %s attempt %d: rendering %d image(s)",
        job_id,
        spec.attempt,
        len(spec.pending_indices()),
    )
    # Its start (the RUNNING event, its wait in the queue) went out with the claim's commit.
    run = JobRun(context, spec)
    run.lease.start()
    end: RenderEnd | None
    context.current_job = job_id
    try:
        end = _render_pending_images(context, run)
    except torch.OutOfMemoryError:
        log.error("job %s: out of device memory", job_id)
        end = Fail(OUT_OF_MEMORY)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        log.exception("job %s: render failed", job_id)
        end = Fail(RENDER_FAILED)
    except BaseException:
        # The process is going down: what was rendered is still stored and recorded
        # (the drain), and the job is left RUNNING for lease recovery, as after a crash.
        context.post.submit(RenderEnded(run, LeftToRecovery("the worker is going down")))
        raise
    finally:
        context.current_job = None
    # After the images already queued: a job ends only once they are recorded.
    if end is not None:
        context.post.submit(RenderEnded(run, end))
    run.mark_rendered()
    return run


def run_render_job(context: WorkerContext, job_id: str) -> None:
    """Render a job and wait until it is settled; a no-op for a job that is not claimable."""
    run = start_render_job(context, job_id)
    if run is not None:
        run.wait()


def _render_pending_images(context: WorkerContext, run: JobRun) -> RenderEnd | None:
    """Render the pending images in memory-sized calls; the job's end, None if an image ends it."""
    spec = run.spec
    params = spec.params
    settings = context.settings
    reporter = run.reporter
    memory = MemoryModel(
        bytes_per_megapixel=settings.memory_per_megapixel_mb * MIB,
        reserve_bytes=settings.memory_reserve_mb * MIB,
    )
    per_call = context.renderer.images_per_call(params, settings.render_batch_size, memory)
    calls = plan_chunks(spec.pending_indices(), per_call)
    reporter.write(0, params.steps)
    for number, indices in enumerate(calls):
        started = time.monotonic()
        with context.busy.measure():
            images = context.renderer.render(
                params, [spec.image_seed(i) for i in indices], reporter.step, reporter.should_stop
            )
        render_s = time.monotonic() - started
        run.render_s += render_s  # a call stopped midway used the device too
        if images is None:
            log.info("job %s: stopped mid-render", spec.job_id)
            return _stopped(run)
        last_call = number == len(calls) - 1
        for position, (index, image) in enumerate(zip(indices, images, strict=True)):
            ends_job = last_call and position == len(indices) - 1
            context.post.submit(
                RenderedImage(
                    run,
                    index,
                    image,
                    context.renderer.generation_record(params, spec.image_seed(index)),
                    finish=Finish(run.stop_reason()) if ends_job else None,
                    render_s=render_s if position == 0 else None,
                    call_images=len(indices),
                )
            )
        if not last_call and reporter.should_stop():
            return _stopped(run)
    # Nothing was pending (an earlier attempt delivered every image): end the job now.
    return Finish() if not calls else None


def _stopped(run: JobRun) -> RenderEnd:
    """The end of a render stopped early: a cancel or deadline ends the job, else recovery."""
    if run.settled or run.lease.lost.is_set():
        return LeftToRecovery("the attempt is over or lost its claim")
    return Finish(run.stop_reason())


def _claim(session: Session, job_id: str, worker: str, lease: timedelta) -> RenderSpec | None:
    """Claim a job for this worker."""
    return claim_job(session, job_id, worker, lease)
