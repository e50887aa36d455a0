"""What a status update from the worker API costs in SQL statements."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import FailureKind, JobStatus, Outcome, StatusUpdate
from labcloud.db import unit_of_work
from tests.user_api.jobs.conftest import OWNER, create_job
from user_api.jobs import service
from user_api.models import EmailOutbox


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


def _update(
    engine: Engine, sessions: sessionmaker[Session], update: StatusUpdate
) -> tuple[bool, list[str]]:
    with _statements(engine) as statements, unit_of_work(sessions) as session:
        applied = service.apply_status_update(session, update).applied
    return applied, statements


def test_a_terminal_update_with_an_email_costs_at_most_four_statements(
    client: TestClient, owner: dict[str, str], engine: Engine, sessions: sessionmaker[Session]
) -> None:
    # Before the job lifecycle it cost six: the job read, the guarded update, the
    # slot's update, the job read again, the owner's address read, the email insert.
    # Now: the guarded update, the slot's update, the mark that the owner's storage
    # count is to be recounted (the job's results landed), the email insert.
    job_id = create_job(client, owner)
    applied, statements = _update(
        engine, sessions, StatusUpdate(job_id=job_id, status=JobStatus.RUNNING)
    )
    assert applied and len(statements) == 1, statements

    outcome = Outcome(exit_code=2, failure=FailureKind.USER_ERROR, attempt=1)
    applied, statements = _update(
        engine,
        sessions,
        StatusUpdate(
            job_id=job_id, status=JobStatus.ERROR, runtime_details="boom", outcome=outcome
        ),
    )
    assert applied
    assert len(statements) <= 4, "\n".join(statements)
    with sessions() as session:
        [email] = session.scalars(select(EmailOutbox)).all()
    assert email.job_id == job_id and email.recipient == OWNER


def test_only_an_ignored_update_reads_the_job(
    client: TestClient, owner: dict[str, str], engine: Engine, sessions: sessionmaker[Session]
) -> None:
    job_id = create_job(client, owner)
    applied, statements = _update(
        engine, sessions, StatusUpdate(job_id=job_id, status=JobStatus.QUEUED)
    )
    assert not applied  # queued -> queued is no move
    assert len(statements) == 2, statements  # the guarded update, then the read
