"""The job lifecycle: what follows from each status change, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import FailureKind, JobStatus, Outcome
from labcloud.db import unit_of_work
from labcloud.outbox import register_waker
from tests.user_api.jobs.conftest import OWNER, create_job
from user_api.jobs.lifecycle import Cause, Transitioned, transition
from user_api.models import EmailOutbox, User, WorkerOutbox


def _move(
    sessions: sessionmaker[Session],
    job_id: int,
    target: JobStatus,
    outcome: Outcome | None = None,
    *,
    cause: Cause = Cause.WORKER,
    details: str | None = None,
) -> Transitioned | None:
    with unit_of_work(sessions) as session:
        return transition(session, job_id, target, outcome, cause=cause, runtime_details=details)


def _active_jobs(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalars(select(User.active_jobs).where(User.email == OWNER)).one())


def _emails(sessions: sessionmaker[Session]) -> list[EmailOutbox]:
    with sessions() as session:
        return list(session.scalars(select(EmailOutbox).order_by(EmailOutbox.id)))


def _worker_outbox(sessions: sessionmaker[Session]) -> list[tuple[str, dict[str, object] | None]]:
    with sessions() as session:
        rows = session.scalars(select(WorkerOutbox).order_by(WorkerOutbox.id))
        return [(row.kind, row.payload) for row in rows]


def _delivered(sessions: sessionmaker[Session]) -> None:
    """As if the worker API had received every message written so far."""
    with unit_of_work(sessions) as session:
        session.execute(delete(WorkerOutbox))


def test_a_terminal_status_frees_the_slot_stores_the_outcome_and_queues_one_email(
    client: TestClient, owner: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    job_id = create_job(client, owner, "failing")
    assert _active_jobs(sessions) == 1
    assert _move(sessions, job_id, JobStatus.RUNNING) is not None
    assert _active_jobs(sessions) == 1 and _emails(sessions) == []

    ended = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    outcome = Outcome(
        exit_code=3, failure=FailureKind.USER_ERROR, attempt=2, ended_at=ended, log_tail="oops"
    )
    moved = _move(sessions, job_id, JobStatus.ERROR, outcome, details="exit code 3")
    assert moved is not None
    assert (moved.job_id, moved.job_name, moved.status, moved.cause, moved.email_queued) == (
        job_id,
        "failing",
        JobStatus.ERROR,
        Cause.WORKER,
        True,
    )
    assert _active_jobs(sessions) == 0
    [email] = _emails(sessions)
    assert email.subject == "LabCloud: job 'failing' failed"
    assert "Exit code:   3" in email.text and "the job's program failed" in email.text
    assert "exit code 3" in email.text  # the log's tail, from runtime_details

    job = client.get(f"/jobs/{job_id}", headers=owner).json()
    assert job["status"] == "error" and job["runtime_details"] == "exit code 3"
    assert job["outcome"] == {
        "exit_code": 3,
        "failure": "user_error",
        "attempt": 2,
        "started_at": None,
        "ended_at": "2026-01-02T03:04:05Z",
        "log_tail": "oops",
        "runner": None,
        "backend": None,
        "run_id": None,
    }

    # Delivered again, or late and different: nothing moves, nothing more is written.
    assert _move(sessions, job_id, JobStatus.ERROR, outcome) is None
    assert _move(sessions, job_id, JobStatus.FINISHED) is None
    assert _active_jobs(sessions) == 0 and len(_emails(sessions)) == 1
    assert client.get(f"/jobs/{job_id}", headers=owner).json()["status"] == "error"


def test_an_active_job_shows_no_outcome(client: TestClient, owner: dict[str, str]) -> None:
    job_id = create_job(client, owner)
    assert client.get(f"/jobs/{job_id}", headers=owner).json()["outcome"] is None


def test_an_owner_who_opted_out_gets_no_email(
    client: TestClient, owner: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    client.put("/user/notifications", json={"email_notifications": False}, headers=owner)
    job_id = create_job(client, owner)
    moved = _move(sessions, job_id, JobStatus.FINISHED, Outcome(exit_code=0))
    assert moved is not None and not moved.email_queued
    assert _emails(sessions) == [] and _active_jobs(sessions) == 0


@pytest.mark.parametrize(
    ("cause", "discard_outputs", "announced"),
    [
        (Cause.USER_CANCEL, False, True),
        (Cause.ADMIN_CANCEL, False, True),
        (Cause.DELETE, True, False),
    ],
)
def test_cancelling_a_job_the_worker_api_has_tells_it(
    client: TestClient,
    owner: dict[str, str],
    sessions: sessionmaker[Session],
    cause: Cause,
    discard_outputs: bool,
    announced: bool,
) -> None:
    job_id = create_job(client, owner)
    _delivered(sessions)
    moved = _move(sessions, job_id, JobStatus.CANCELED, cause=cause)
    assert moved is not None and moved.email_queued is announced
    assert _worker_outbox(sessions) == [("cancel", {"discard_outputs": discard_outputs})]
    assert _active_jobs(sessions) == 0
    assert len(_emails(sessions)) == int(announced)
    # The job ended: a second cancellation is no move and tells the worker API nothing.
    assert _move(sessions, job_id, JobStatus.CANCELED, cause=cause) is None
    assert len(_worker_outbox(sessions)) == 1


def test_cancelling_a_job_not_yet_sent_withdraws_it(
    client: TestClient, owner: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    job_id = create_job(client, owner)
    assert [kind for kind, _ in _worker_outbox(sessions)] == ["enqueue"]
    canceled = client.post(f"/jobs/{job_id}/cancel", headers=owner).json()
    assert _worker_outbox(sessions) == []
    assert canceled["runtime_details"] == "canceled by the user"
    assert canceled["outcome"]["failure"] == "canceled"
    ended_at = datetime.fromisoformat(canceled["outcome"]["ended_at"])
    assert ended_at == datetime.fromisoformat(canceled["date_finished"])


def test_a_job_the_worker_api_refused_ends_in_error(
    client: TestClient, owner: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    job_id = create_job(client, owner)
    _delivered(sessions)  # the forwarder settles the refused enqueue itself
    moved = _move(
        sessions,
        job_id,
        JobStatus.ERROR,
        cause=Cause.QUEUE_REFUSED,
        details="could not be queued: bad hardware",
    )
    assert moved is not None and moved.email_queued
    assert _worker_outbox(sessions) == []
    job = client.get(f"/jobs/{job_id}", headers=owner).json()
    assert job["status"] == "error"
    assert job["runtime_details"] == "could not be queued: bad hardware"
    assert job["outcome"]["failure"] == "system_error"


@pytest.mark.parametrize(
    ("cause", "target"),
    [
        (Cause.USER_CANCEL, JobStatus.FINISHED),
        (Cause.DELETE, JobStatus.ERROR),
        (Cause.QUEUE_REFUSED, JobStatus.CANCELED),
    ],
)
def test_a_cause_moves_a_job_only_to_its_status(
    client: TestClient,
    owner: dict[str, str],
    sessions: sessionmaker[Session],
    cause: Cause,
    target: JobStatus,
) -> None:
    job_id = create_job(client, owner)
    with pytest.raises(ValueError, match=str(cause)):
        _move(sessions, job_id, target, cause=cause)
    assert client.get(f"/jobs/{job_id}", headers=owner).json()["status"] == "queued"


@pytest.fixture
def woken() -> Iterator[list[str]]:
    """The outboxes whose relays were woken, in order."""
    names: list[str] = []
    unregister = [
        register_waker(name, lambda name=name: names.append(name))  # type: ignore[misc]
        for name in ("worker_outbox", "email_outbox")
    ]
    yield names
    for undo in unregister:
        undo()


def test_commits_that_write_an_outbox_wake_its_relays(
    client: TestClient,
    owner: dict[str, str],
    sessions: sessionmaker[Session],
    woken: list[str],
) -> None:
    job_id = create_job(client, owner)
    assert woken == ["worker_outbox"]
    # A refused submission rolls back: its outbox row is gone, nobody is woken.
    refused = client.post(
        "/jobs",
        json={
            "job_name": "job-1",
            "application": {"application": "demo", "version": "latest", "entrypoint": "wordcount"},
        },
        headers=owner,
    )
    assert refused.status_code == 409
    assert woken == ["worker_outbox"]

    _delivered(sessions)
    woken.clear()
    assert _move(sessions, job_id, JobStatus.RUNNING) is not None
    assert woken == []  # nothing written to an outbox
    assert _move(sessions, job_id, JobStatus.FINISHED) is not None
    assert woken == ["email_outbox"]
