"""Engines: PostgreSQL connections bounded on the network, the URL's own settings kept."""

from __future__ import annotations

import sqlalchemy

from shared.db import POSTGRES_NETWORK, make_engine


def _dsn_settings(url: str) -> dict[str, str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            dsn: str = connection.connection.dbapi_connection.info.dsn  # type: ignore[union-attr]
    finally:
        engine.dispose()
    return dict(part.split("=", 1) for part in dsn.split())


def test_postgres_connections_time_out_on_a_silent_network(postgres_database: str) -> None:
    settings = _dsn_settings(postgres_database)
    for name, value in POSTGRES_NETWORK.items():
        assert settings[name] == str(value), name


def test_a_setting_in_the_url_wins(postgres_database: str) -> None:
    url = sqlalchemy.make_url(postgres_database).update_query_dict({"connect_timeout": "3"})
    settings = _dsn_settings(url.render_as_string(hide_password=False))
    assert settings["connect_timeout"] == "3"
    assert settings["tcp_user_timeout"] == str(POSTGRES_NETWORK["tcp_user_timeout"])
