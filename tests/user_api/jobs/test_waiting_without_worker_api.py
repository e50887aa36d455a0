"""GET /jobs/{id} of a queued job answers with ``waiting`` null, and in time, when
the worker API is down or does not answer; GET /admin/workers says 503."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.user_api.helpers import login, signup
from tests.user_api.jobs.conftest import create_job
from user_api.app import create_app
from user_api.jobs.service import WAITING_ANSWER_SECONDS
from user_api.settings import UserApiSettings


@pytest.fixture
def silent_worker_api() -> Iterator[str]:
    """A worker API that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_a_worker_api_that_is_down_leaves_waiting_null(
    client: TestClient, owner: dict[str, str]
) -> None:
    job_id = create_job(client, owner)
    response = client.get(f"/jobs/{job_id}", headers=owner)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "queued"
    assert response.json()["waiting"] is None
    admin = login(client, "admin@example.org")
    workers = client.get("/admin/workers", headers=admin)
    assert workers.status_code == 503, workers.text
    assert "does not say which workers are connected" in workers.json()["detail"]


def test_a_silent_worker_api_leaves_waiting_null_in_time(
    user_settings: UserApiSettings, silent_worker_api: str
) -> None:
    settings = user_settings.model_copy(update={"workerfacing_api_url": silent_worker_api})
    with TestClient(create_app(settings)) as client:
        owner = signup(client, "ada@example.org")
        job_id = create_job(client, owner)
        began = time.monotonic()
        response = client.get(f"/jobs/{job_id}", headers=owner)
        took = time.monotonic() - began
    assert response.status_code == 200, response.text
    assert response.json()["waiting"] is None
    assert WAITING_ANSWER_SECONDS <= took < WAITING_ANSWER_SECONDS + 3
