"""The busy meter: the share of wall time a worker's device spends inside pipeline calls."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Final

# The sliding window of the busy fraction a worker reports in its heartbeat.
BUSY_WINDOW_S: Final = 60.0


class BusyMeter:
    """Time spent inside pipeline calls, as a fraction of wall time: recent and since start."""

    def __init__(
        self, window_s: float = BUSY_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._window_s = window_s
        self._started = clock()
        self._lock = threading.Lock()
        self._spans: deque[tuple[float, float]] = deque()
        self._total = 0.0
        self._since: float | None = None  # start of the call in progress

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Count the time inside this block as busy."""
        start = self._clock()
        with self._lock:
            self._since = start
        try:
            yield
        finally:
            end = self._clock()
            with self._lock:
                self._since = None
                self._total += end - start
                self._spans.append((start, end))
                while self._spans and self._spans[0][1] <= end - self._window_s:
                    self._spans.popleft()

    @property
    def busy_s(self) -> float:
        """Seconds spent inside finished calls since start."""
        with self._lock:
            return self._total

    def fractions(self) -> tuple[float, float]:
        """Busy fraction over the window (or since start, if shorter) and since start."""
        now = self._clock()
        with self._lock:
            spans = list(self._spans)
            total = self._total
            if self._since is not None:
                spans.append((self._since, now))
                total += now - self._since
        window_start = max(self._started, now - self._window_s)
        recent = sum(max(0.0, end - max(start, window_start)) for start, end in spans)
        return _ratio(recent, now - window_start), _ratio(total, now - self._started)


def _ratio(busy: float, wall: float) -> float:
    return round(min(1.0, max(0.0, busy / wall)), 3) if wall > 0 else 0.0
