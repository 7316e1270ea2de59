"""The per-app resources views use: settings, database, Redis and storage."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import Settings
from shared.storage import ResultStorage

EXTENSION_KEY = "kolors_farm"


@dataclass
class FarmContext:
    """Long-lived clients, built once by the app factory."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    redis: redis.Redis
    storage: ResultStorage


def farm() -> FarmContext:
    """The current app's farm context."""
    context: FarmContext = current_app.extensions[EXTENSION_KEY]
    return context
