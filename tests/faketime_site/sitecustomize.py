"""Loaded only by processes run under libfaketime on a test host with a wrong clock.

libfaketime 0.9.10 (Debian 12) fails `clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`
with EINVAL when FAKETIME_DONT_FAKE_MONOTONIC is set, and CPython's `time.sleep` uses
exactly that call: every sleep would raise OSError (kombu's reconnect loop, for one,
would end the worker). `select` with a timeout is a sleep libfaketime leaves alone.
"""

import operator
import select
import time
from typing import SupportsIndex


def _sleep(length: float | SupportsIndex) -> None:
    """Sleep `length` seconds through select(2), which libfaketime does not break."""
    seconds = length if isinstance(length, float) else float(operator.index(length))
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    select.select([], [], [], seconds)


time.sleep = _sleep
