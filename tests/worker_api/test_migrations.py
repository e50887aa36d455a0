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

from labcloud.db import create_db_engine, migrate
from tests.databases import temporary_postgres_database
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
        if "status" not in table.c:
            continue
        reflected = inspector.get_check_constraints(table.name)
        assert {c["name"] for c in reflected} == {f"ck_{table.name}_status"}
        [constraint] = reflected
        for status in ("queued", "pulled", "running", "finished", "error", "canceled"):
            assert f"'{status}'" in constraint["sqltext"]


def _index_definitions(engine: Engine) -> dict[str, str]:
    """Each index's definition as the database itself stores it (sort order and
    partial-index predicate included, which autogenerate does not compare)."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.execute(
                text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
            ).all()
        else:
            rows = connection.execute(
                text(
                    "SELECT indexname, indexdef FROM pg_indexes "
                    "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
                )
            ).all()
    return {name: " ".join(definition.split()) for name, definition in rows}


@pytest.fixture
def models_engine(
    fresh_engine: Engine, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Engine]:
    """A database of the same kind as ``fresh_engine``, built from the models."""
    if fresh_engine.dialect.name == "postgresql":
        admin_url = request.getfixturevalue("postgres_admin_url")
        with temporary_postgres_database(admin_url) as url:
            engine = create_db_engine(url)
            Base.metadata.create_all(engine)
            yield engine
            engine.dispose()
    else:
        engine = create_db_engine(f"sqlite:///{tmp_path / 'models.db'}")
        Base.metadata.create_all(engine)
        yield engine
        engine.dispose()


def test_indexes_are_the_models(fresh_engine: Engine, models_engine: Engine) -> None:
    migrate(fresh_engine, MIGRATIONS)
    migrated = _index_definitions(fresh_engine)
    assert migrated == _index_definitions(models_engine)
    assert {"ix_queued_jobs_pull", "ix_queued_jobs_lease_expires_at"} <= set(migrated)
    assert "priority DESC" in migrated["ix_queued_jobs_pull"]
    assert "'queued'" in migrated["ix_queued_jobs_pull"]


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


def test_requirements_left_unset_become_zero(fresh_engine: Engine) -> None:
    """Upgrading a queue that holds jobs turns their unset requirements (NULL) into
    0, which a pull compares with a plain <=; set ones are kept."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with fresh_engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
        for job_id, memory in ((1, None), (2, 16000)):
            connection.execute(
                text(
                    "INSERT INTO queued_jobs (job_id, spec, paths_upload, priority, memory, "
                    "status, attempts, failed_workers, created_at, updated_at) VALUES "
                    "(:job_id, '{}', '{}', 0, :memory, 'queued', 0, '[]', "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"job_id": job_id, "memory": memory},
            )
    migrate(fresh_engine, MIGRATIONS)
    with fresh_engine.connect() as connection:
        rows = connection.execute(
            text("SELECT job_id, cpu_cores, memory, gpu_mem FROM queued_jobs ORDER BY job_id")
        ).all()
    assert [tuple(row) for row in rows] == [(1, 0, 0, 0), (2, 0, 16000, 0)]


def test_outcome_column_keeps_pending_status_changes(fresh_engine: Engine) -> None:
    """Status changes waiting in the outbox when 0005 runs stay there, without an
    outcome; a downgrade keeps them too and drops only the column."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    pending = text(
        "INSERT INTO status_outbox (job_id, status, runtime_details, created_at) "
        "VALUES (7, 'running', 'step 2', CURRENT_TIMESTAMP)"
    )
    with fresh_engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
        connection.execute(pending)
    migrate(fresh_engine, MIGRATIONS)
    with fresh_engine.begin() as connection:
        rows = connection.execute(
            text("SELECT job_id, status, runtime_details, outcome FROM status_outbox")
        ).all()
        assert [tuple(row) for row in rows] == [(7, "running", "step 2", None)]
        config.attributes["connection"] = connection
        command.downgrade(config, "0004")
    assert "outcome" not in {c["name"] for c in inspect(fresh_engine).get_columns("status_outbox")}
    with fresh_engine.connect() as connection:
        assert connection.execute(text("SELECT job_id FROM status_outbox")).scalars().all() == [7]
