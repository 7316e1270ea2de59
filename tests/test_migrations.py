"""The migrated schema matches the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from shared.migrate import alembic_config, migrate_database
from shared.models import Base


def test_migrated_schema_matches_models(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_and_upgrade_again(engine: Engine, database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate_database(database_url)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
