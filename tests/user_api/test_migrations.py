"""The Alembic environment builds exactly the schema the models declare."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from labcloud.db import build_database_url, create_db_engine, migrate
from user_api.app import MIGRATIONS
from user_api.models import Base


def test_migrations_match_models(database_url: str) -> None:
    engine = create_db_engine(build_database_url(database_url))
    try:
        migrate(engine, MIGRATIONS)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            tables = set(inspect(connection).get_table_names())
        assert {"users", "jobs", "worker_outbox", "alembic_version"} <= tables
        migrate(engine, MIGRATIONS)  # idempotent
    finally:
        engine.dispose()
