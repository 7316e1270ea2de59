"""Logging for every process the farm runs: one format, to stderr."""

from __future__ import annotations

import logging
from typing import Final

LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Send this process's log records at `level` and above to stderr in the farm's format."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
