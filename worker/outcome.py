"""How an attempt of a job ends: what its render asks for, and what the attempt settled as.

Two closed sets, so that an impossible combination (a failure that also finishes, an
end that is both dropped and failed) cannot be built:

- `RenderEnd`, what the render thread hands the post-processing thread when no image
  carries the job's end: `Finish` the job, `Fail` it, or leave it (`LeftToRecovery`);
- `JobOutcome`, what `JobRun.settle` records: the job `Ended` in a state this attempt
  committed (counted and announced), or it was `LeftToRecovery` (RUNNING, for the lease
  recovery to requeue; nothing is announced, another attempt or the reconciler ends it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from shared.models import JobState

RENDER_FAILED: Final = "The render failed on the worker; the credits were released"
STORE_UNREACHABLE: Final = (
    "The result store was unreachable; the credits of the undelivered images were released"
)
OUT_OF_MEMORY: Final = (
    "Out of GPU memory for this size and number of images; the credits were released"
)


@dataclass(frozen=True)
class Finish:
    """End the rendered job: COMPLETED, or CANCELLED when a cancel or `stopped_because` says so."""

    stopped_because: str | None = None


@dataclass(frozen=True)
class Fail:
    """Fail the job with `error` (fenced by the attempt) and release its credits."""

    error: str


@dataclass(frozen=True)
class LeftToRecovery:
    """Write nothing more: the job stays RUNNING until its lease lapses and recovery requeues it."""

    reason: str


@dataclass(frozen=True)
class Ended:
    """The job ended in `state`, committed by this attempt."""

    state: JobState


RenderEnd = Finish | Fail | LeftToRecovery
JobOutcome = Ended | LeftToRecovery
