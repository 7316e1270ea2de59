"""Every supported scheduler runs correctly on the real KolorsPipeline (tiny checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shared.jobs.params import SCHEDULERS, KolorsParams
from worker.pipeline import KolorsRenderer

STEPS = 6


def run(
    renderer: KolorsRenderer, scheduler: str, seed: int, steps_seen: list[tuple[int, int]]
) -> np.ndarray:
    params = KolorsParams(
        prompt="a lighthouse at dusk", width=512, height=512, steps=STEPS, scheduler=scheduler
    )
    images = renderer.render(params, [seed], lambda i, n: steps_seen.append((i, n)), lambda: False)
    assert images is not None
    image: Image.Image = images[0]
    assert image.size == (512, 512)
    return np.asarray(image, dtype=np.float32)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_scheduler_is_deterministic_seed_sensitive_and_reports_progress(
    renderer: KolorsRenderer, scheduler: str
) -> None:
    steps: list[tuple[int, int]] = []
    first = run(renderer, scheduler, 1, steps)
    assert type(renderer.pipe.scheduler).__name__ == scheduler
    assert np.isfinite(first).all() and first.std() > 1
    # Progress counts the scheduler's own timesteps (Heun and KDPM2 take two per step).
    total = len(renderer.pipe.scheduler.timesteps)
    assert total >= STEPS
    assert steps == [(i, total) for i in range(1, total + 1)]
    assert np.array_equal(first, run(renderer, scheduler, 1, []))
    assert np.abs(first - run(renderer, scheduler, 2, [])).mean() > 5


def test_unsupported_scheduler_is_refused(renderer: KolorsRenderer) -> None:
    with pytest.raises(ValueError, match="unsupported scheduler"):
        renderer.scheduler("FlowMatchEulerDiscreteScheduler")


def test_schedulers_are_built_once(renderer: KolorsRenderer) -> None:
    assert renderer.scheduler("DDIMScheduler") is renderer.scheduler("DDIMScheduler")
