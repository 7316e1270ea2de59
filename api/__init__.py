"""The farm's HTTP API: a Flask app factory and thin views over `shared`."""

from api.app import create_app

__all__ = ["create_app"]
