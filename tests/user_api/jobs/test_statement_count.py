"""What a status update from the worker API costs in SQL statements."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import JobStatus, StatusUpdate
from labcloud.db import create_db_engine, make_session_factory, unit_of_work
from tests.user_api.helpers import signup
from user_api.jobs import service
from user_api.models import EmailOutbox
from user_api.notifications.service import CompletionEmails, enable_completion_emails
from user_api.settings import UserApiSettings


@pytest.fixture
def engine(user_settings: UserApiSettings) -> Iterator[Engine]:
    engine = create_db_engine(user_settings.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    """Sessions of the app's database that queue completion emails (the app under
    test runs without an email sender, so nothing sends them meanwhile)."""
    factory = make_session_factory(engine)
    enable_completion_emails(factory, CompletionEmails(frontend_url=None))
    return factory


@contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements this thread runs on ``engine`` inside the block; the
    transaction's own ``BEGIN`` (SQLite's ``BEGIN IMMEDIATE``) is not one."""
    recorded: list[str] = []
    thread = threading.get_ident()

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if threading.get_ident() == thread and not statement.lstrip().upper().startswith("BEGIN"):
            recorded.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield recorded
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_terminal_update_with_an_email_costs_at_most_three_statements(
    client: TestClient, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    headers = signup(client, "ada@example.org")
    body = {
        "job_name": "counted",
        "application": {"application": "demo", "version": "latest", "entrypoint": "wordcount"},
    }
    job_id = client.post("/jobs", json=body, headers=headers).json()["id"]
    with unit_of_work(sessions) as session:
        service.apply_status_update(session, StatusUpdate(job_id=job_id, status=JobStatus.RUNNING))

    with _statements(engine) as statements, unit_of_work(sessions) as session:
        applied = service.apply_status_update(
            session, StatusUpdate(job_id=job_id, status=JobStatus.FINISHED)
        )
    assert applied.applied
    with sessions() as session:
        [email] = session.scalars(select(EmailOutbox)).all()
    assert email.job_id == job_id and email.recipient == "ada@example.org"
    assert len(statements) <= 3, "\n".join(statements)
