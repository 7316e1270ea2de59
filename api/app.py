"""The Flask app factory."""

from __future__ import annotations

import logging

from flask import Flask

from api.admin import bp as admin_bp
from api.auth import add_remaining_credits
from api.console import bp as console_bp
from api.context import EXTENSION_KEY
from api.errors import register_error_handlers
from api.history import bp as history_bp
from api.metrics import bp as metrics_bp
from api.openapi import bp as openapi_bp
from api.stream import bp as stream_bp
from api.views import bp
from api.webhooks import bp as webhooks_bp
from shared.resources import open_resources
from shared.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API for `settings` (read from the environment when omitted)."""
    settings = settings or Settings()
    # Assets are served by their pages' blueprints, under those pages' security headers.
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    resources = open_resources(settings)
    app.extensions[EXTENSION_KEY] = resources
    app.register_blueprint(bp)
    app.register_blueprint(openapi_bp)
    app.register_blueprint(history_bp)
    app.register_blueprint(metrics_bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(console_bp)
    app.register_blueprint(webhooks_bp)
    app.register_blueprint(stream_bp)
    app.after_request(add_remaining_credits)
    register_error_handlers(app)
    logging.getLogger(__name__).info(
        "API ready (database %s)", resources.engine.url.render_as_string()
    )
    return app
