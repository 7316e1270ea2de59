"""The Flask app factory."""

from __future__ import annotations

import logging

from flask import Flask

from api.auth import add_remaining_credits
from api.context import EXTENSION_KEY, FarmContext
from api.errors import register_error_handlers
from api.openapi import bp as openapi_bp
from api.views import bp
from shared.db import make_engine, make_session_factory
from shared.events import make_redis
from shared.settings import Settings
from shared.storage import make_storage


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API for `settings` (read from the environment when omitted)."""
    settings = settings or Settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    engine = make_engine(settings.resolved_database_url)
    app.extensions[EXTENSION_KEY] = FarmContext(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        redis=make_redis(settings.require_redis_url()),
        storage=make_storage(settings.resolved_storage_url),
    )
    app.register_blueprint(bp)
    app.register_blueprint(openapi_bp)
    app.after_request(add_remaining_credits)
    register_error_handlers(app)
    logging.getLogger(__name__).info("API ready (database %s)", engine.url.render_as_string())
    return app
