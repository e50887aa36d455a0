"""``GET /jobs/{id}?wait=SECONDS``: the answer comes when the job's status changes
(woken at once by a change this process commits, or by the next read for one
another process committed), at the deadline otherwise, and at once for a job that
has ended or is no longer in the status the client knows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import unit_of_work
from tests.user_api.helpers import signup
from tests.user_api.jobs.conftest import create_job
from user_api.app import create_app
from user_api.jobs.watch import JOB_WATCH
from user_api.models import Job
from user_api.settings import UserApiSettings

Factory = Callable[..., TestClient]


@pytest.fixture
def make_client(user_settings: UserApiSettings) -> Iterator[Factory]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = user_settings.model_copy(update=overrides)
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def report(client: TestClient, job_id: int, status: str) -> None:
    app: Any = client.app
    key = {"x-api-key": app.state.settings.internal_api_key_secret.get_secret_value()}
    answer = client.put("/_job_status", json={"job_id": job_id, "status": status}, headers=key)
    assert answer.status_code == 200, answer.text


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    return thread, result


def wait_until_waiting(count: int) -> None:
    deadline = time.monotonic() + 10
    while JOB_WATCH.waiting < count:
        assert time.monotonic() < deadline, "the request never started waiting"
        time.sleep(0.01)


def test_a_change_in_this_process_answers_at_once(make_client: Factory) -> None:
    # The read-again interval is far beyond the test: only the wake-up can answer.
    client = make_client(job_wait_poll_seconds=60)
    owner = signup(client, "ada@example.org")
    job_id = create_job(client, owner)
    started = time.monotonic()
    thread, result = in_background(
        lambda: client.get(f"/jobs/{job_id}", params={"wait": 30}, headers=owner)
    )
    wait_until_waiting(1)
    report(client, job_id, "pulled")
    thread.join(timeout=20)
    answer = result[0]
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "pulled"
    assert time.monotonic() - started < 20
    assert JOB_WATCH.waiting == 0


def test_a_change_another_process_committed_is_read_again(make_client: Factory) -> None:
    client = make_client(job_wait_poll_seconds=0.1)
    owner = signup(client, "ada@example.org")
    job_id = create_job(client, owner)
    thread, result = in_background(
        lambda: client.get(f"/jobs/{job_id}", params={"wait": 30}, headers=owner)
    )
    wait_until_waiting(1)
    app: Any = client.app
    sessions: sessionmaker[Session] = app.state.session_factory
    # Written straight to the database, as another server process would: no wake-up.
    with unit_of_work(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running"))
    thread.join(timeout=20)
    assert result[0].json()["status"] == "running"


def test_no_change_answers_at_the_deadline(make_client: Factory) -> None:
    client = make_client(job_wait_poll_seconds=0.1)
    owner = signup(client, "ada@example.org")
    job_id = create_job(client, owner)
    started = time.monotonic()
    answer = client.get(f"/jobs/{job_id}", params={"wait": 0.5}, headers=owner)
    assert answer.status_code == 200
    assert answer.json()["status"] == "queued"
    assert time.monotonic() - started >= 0.5


def test_what_answers_at_once(make_client: Factory) -> None:
    client = make_client(job_wait_poll_seconds=60)
    owner = signup(client, "ada@example.org")
    job_id = create_job(client, owner)
    report(client, job_id, "pulled")
    # The client knew it queued: it has changed since.
    known = client.get(f"/jobs/{job_id}", params={"wait": 30, "status": "queued"}, headers=owner)
    assert known.json()["status"] == "pulled"
    report(client, job_id, "running")
    report(client, job_id, "finished")
    ended = client.get(f"/jobs/{job_id}", params={"wait": 30}, headers=owner)
    assert ended.json()["status"] == "finished"
    other = signup(client, "bob@example.org")
    assert client.get(f"/jobs/{job_id}", params={"wait": 30}, headers=other).status_code == 404
    plain = client.get(f"/jobs/{job_id}", headers=owner)
    assert plain.status_code == 200 and plain.json()["status"] == "finished"


def test_bounds(make_client: Factory) -> None:
    client = make_client(job_wait_max_seconds=5, job_wait_max_waiting=1, job_wait_poll_seconds=60)
    owner = signup(client, "ada@example.org")
    job_id = create_job(client, owner)
    too_long = client.get(f"/jobs/{job_id}", params={"wait": 6}, headers=owner)
    assert too_long.status_code == 400
    assert "at most 5 seconds" in too_long.json()["detail"]
    for bad in ("-1", "nan", "soon", "1e9"):
        assert client.get(f"/jobs/{job_id}?wait={bad}", headers=owner).status_code == 422, bad
    unknown = client.get(f"/jobs/{job_id}?wait=1&status=sleeping", headers=owner)
    assert unknown.status_code == 422
    thread, result = in_background(
        lambda: client.get(f"/jobs/{job_id}", params={"wait": 5}, headers=owner)
    )
    wait_until_waiting(1)
    crowded = client.get(f"/jobs/{job_id}", params={"wait": 5}, headers=owner)
    assert crowded.status_code == 503
    assert "already wait" in crowded.json()["detail"]
    report(client, job_id, "pulled")
    thread.join(timeout=20)
    assert result[0].json()["status"] == "pulled"
