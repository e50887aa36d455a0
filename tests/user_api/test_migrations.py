"""The Alembic environment builds exactly the schema the models declare."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text, update

from labcloud.db import build_database_url, create_db_engine, migrate
from user_api.app import MIGRATIONS
from user_api.models import Base, Job


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


def _upgrade(engine: Engine, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def test_active_jobs_counter_is_filled_from_existing_jobs(database_url: str) -> None:
    """Upgrading a database that already holds jobs counts each account's active ones."""
    engine = create_db_engine(build_database_url(database_url))
    try:
        _upgrade(engine, "0002")
        statuses = ["queued", "running", "finished", "error", "canceled", "pulled"]
        with engine.begin() as connection:
            for user_id in (1, 2, 3):
                connection.execute(
                    text(
                        "INSERT INTO users (id, subject, email, groups, is_active, created_at) "
                        "VALUES (:id, :subject, :email, '[\"users\"]', true, CURRENT_TIMESTAMP)"
                    ),
                    {"id": user_id, "subject": f"s{user_id}", "email": f"u{user_id}@example.org"},
                )
            owned = {1: statuses, 2: ["finished", "canceled"], 3: []}
            for user_id, their_statuses in owned.items():
                for index, status in enumerate(their_statuses):
                    connection.execute(
                        text(
                            "INSERT INTO jobs (user_id, job_name, priority, application, "
                            "attributes, hardware, entrypoint_snapshot, paths_out, status, "
                            "date_created) VALUES (:user_id, :name, 0, '{}', '{}', '{}', '{}', "
                            "'{}', :status, CURRENT_TIMESTAMP)"
                        ),
                        {"user_id": user_id, "name": f"job-{index}", "status": status},
                    )
        migrate(engine, MIGRATIONS)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, active_jobs FROM users")).all()
        counted = {int(user_id): int(active) for user_id, active in rows}
        assert counted == {1: 3, 2: 0, 3: 0}
    finally:
        engine.dispose()


def test_jobs_from_before_outcomes_keep_their_rows(database_url: str) -> None:
    """0005 adds ``jobs.outcome``: jobs already there have none, new ones store it."""
    engine = create_db_engine(build_database_url(database_url))
    try:
        _upgrade(engine, "0004")
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO users (id, subject, email, groups, is_active, created_at) "
                    "VALUES (1, 's1', 'u1@example.org', '[\"users\"]', true, CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO jobs (id, user_id, job_name, priority, application, attributes, "
                    "hardware, entrypoint_snapshot, paths_out, status, runtime_details, "
                    "date_created) VALUES (1, 1, 'old', 0, '{}', '{}', '{}', '{}', '{}', "
                    "'error', 'exit code 1', CURRENT_TIMESTAMP)"
                )
            )
        migrate(engine, MIGRATIONS)
        with engine.begin() as connection:
            old = connection.execute(
                text("SELECT status, runtime_details, outcome FROM jobs")
            ).one()
            assert tuple(old) == ("error", "exit code 1", None)
            connection.execute(
                update(Job).where(Job.id == 1).values(outcome={"exit_code": 1, "attempt": 1})
            )
            stored = connection.execute(select(Job.outcome).where(Job.id == 1)).scalar_one()
        assert stored == {"exit_code": 1, "attempt": 1}
    finally:
        engine.dispose()
