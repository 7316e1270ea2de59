"""The per-app resources views use: settings, database, Redis and storage."""

from __future__ import annotations

from flask import current_app

from shared.resources import Resources

EXTENSION_KEY = "kolors_farm"


def farm() -> Resources:
    """The current app's resources."""
    resources: Resources = current_app.extensions[EXTENSION_KEY]
    return resources
