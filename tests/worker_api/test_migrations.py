"""The migrations build exactly the schema the models describe, on SQLite and
PostgreSQL, and can be undone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.schema import CreateIndex

from labcloud.db import create_db_engine, migrate
from worker_api.app import MIGRATIONS
from worker_api.models import Base


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def fresh_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database, never migrated."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        url = request.getfixturevalue("postgres_database")
    engine = create_db_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _differences(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_migrations_match_the_models(fresh_engine: Engine) -> None:
    migrate(fresh_engine, MIGRATIONS)
    assert _differences(fresh_engine) == []


def test_check_constraints_match_the_models(fresh_engine: Engine) -> None:
    # Autogenerate does not compare CHECK constraints: compare their names and
    # the statuses they allow.
    migrate(fresh_engine, MIGRATIONS)
    inspector = inspect(fresh_engine)
    for table in Base.metadata.sorted_tables:
        reflected = inspector.get_check_constraints(table.name)
        assert {c["name"] for c in reflected} == {f"ck_{table.name}_status"}
        [constraint] = reflected
        for status in ("queued", "pulled", "running", "finished", "error", "canceled"):
            assert f"'{status}'" in constraint["sqltext"]


def test_sqlite_pull_index_is_the_models(tmp_path: Path) -> None:
    # SQLite's reflection drops an index's sort order, which autogenerate then cannot
    # compare: compare the DDL stored by SQLite itself.
    engine = create_db_engine(f"sqlite:///{tmp_path / 'index.db'}")
    migrate(engine, MIGRATIONS)
    table = Base.metadata.tables["queued_jobs"]
    [index] = [i for i in table.indexes if i.name == "ix_queued_jobs_pull"]
    expected = str(CreateIndex(index).compile(dialect=engine.dialect))
    with engine.connect() as connection:
        stored = connection.execute(
            text("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"),
            {"name": index.name},
        ).scalar_one()
    engine.dispose()
    assert " ".join(stored.split()) == " ".join(expected.split())


def test_migrations_are_idempotent_and_reversible(fresh_engine: Engine) -> None:
    migrate(fresh_engine, MIGRATIONS)
    migrate(fresh_engine, MIGRATIONS)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with fresh_engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(inspect(fresh_engine).get_table_names()) <= {"alembic_version"}
    migrate(fresh_engine, MIGRATIONS)
    assert _differences(fresh_engine) == []
