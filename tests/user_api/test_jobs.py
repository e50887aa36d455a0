from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from labcloud.contract import QueueJob
from tests.user_api.helpers import signup
from user_api.models import Job, WorkerOutbox


def _job(name: str = "job-1", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_name": name,
        "application": {"application": "demo", "version": "latest", "entrypoint": "wordcount"},
        "attributes": {"files_down": {"data_ids": ["set"]}},
    }
    body.update(overrides)
    return body


def _upload(client: TestClient, headers: dict[str, str], path: str, content: bytes) -> None:
    folder, name = path.rsplit("/", 1)
    response = client.post(
        f"/files/{folder}/upload", files={"file": (name, content)}, headers=headers
    )
    assert response.status_code == 201, response.text


def _outbox(client: TestClient) -> list[WorkerOutbox]:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(WorkerOutbox).order_by(WorkerOutbox.id)))


def _job_count(client: TestClient) -> int:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        return len(list(session.scalars(select(Job))))


@pytest.fixture
def user(client: TestClient) -> dict[str, str]:
    headers = signup(client, "ada@example.org")
    _upload(client, headers, "data/set/a.txt", b"one two")
    _upload(client, headers, "data/set/sub/b.txt", b"three")
    _upload(client, headers, "data/single.txt", b"four")
    _upload(client, headers, "config/params.yaml", b"x: 1")
    return headers


def test_create_job_expands_inputs_and_writes_the_outbox(
    client: TestClient, user: dict[str, str]
) -> None:
    body = _job(
        attributes={
            "files_down": {"data_ids": ["set", "single.txt"], "config_id": "params.yaml"},
            "env_vars": {"WORDCOUNT_PATTERN": "*.txt"},
        },
        priority=3,
        environment="local",
    )
    response = client.post("/jobs", json=body, headers=user)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["user_email"] == "ada@example.org"
    assert job["hardware"] is None
    [message] = _outbox(client)
    queued = QueueJob.model_validate(message.payload)
    subject = job["user_id"]
    assert queued.job.handler.files_down == {
        "data/a.txt": f"{subject}/data/set/a.txt",
        "data/sub/b.txt": f"{subject}/data/set/sub/b.txt",
        "data/single.txt": f"{subject}/data/single.txt",
        "config/params.yaml": f"{subject}/config/params.yaml",
    }
    assert queued.job.app.env == {"WORDCOUNT_PATTERN": "*.txt"}
    assert queued.job.meta.job_id == job["id"]
    assert queued.job.hardware.memory == 64
    assert queued.priority == 3
    assert queued.paths_upload.output == f"{subject}/output/job-1"


def test_jobs_are_listed_newest_first_and_paged(client: TestClient, user: dict[str, str]) -> None:
    ids = [client.post("/jobs", json=_job(f"j{i}"), headers=user).json()["id"] for i in range(5)]
    listed = client.get("/jobs", headers=user).json()
    assert [job["id"] for job in listed] == ids[::-1]
    page = client.get("/jobs", params={"offset": 1, "limit": 2}, headers=user).json()
    assert [job["id"] for job in page] == ids[::-1][1:3]


@pytest.mark.parametrize(
    ("overrides", "status", "message"),
    [
        (
            {
                "application": {
                    "application": "nope",
                    "version": "latest",
                    "entrypoint": "wordcount",
                }
            },
            400,
            "nope",
        ),
        (
            {"application": {"application": "demo", "version": "9.9", "entrypoint": "wordcount"}},
            400,
            "9.9",
        ),
        (
            {"application": {"application": "demo", "version": "latest", "entrypoint": "x"}},
            400,
            "'x'",
        ),
        ({"attributes": {"files_down": {"data_ids": ["missing"]}}}, 400, "data/missing"),
        ({"attributes": {"files_down": {"data_ids": ["../../etc"]}}}, 400, ".."),
        ({"attributes": {"files_down": {"data_ids": ["%2e%2e/x"]}}}, 400, ""),
        ({"attributes": {"files_down": {"data_ids": ["/abs"]}}}, 400, ""),
        ({"attributes": {"files_down": {"data_ids": ["a\u0000b"]}}}, 400, ""),
        ({"attributes": {"env_vars": {"PATH": "/evil"}}}, 400, "PATH"),
        ({"job_name": "../escape"}, 422, "job_name"),
        ({"job_name": ""}, 422, "job_name"),
        ({"priority": 9}, 422, "priority"),
        ({"unknown": 1}, 422, "unknown"),
    ],
)
def test_bad_jobs_are_refused_and_nothing_is_written(
    client: TestClient,
    user: dict[str, str],
    overrides: dict[str, Any],
    status: int,
    message: str,
) -> None:
    response = client.post("/jobs", json=_job(**overrides), headers=user)
    assert response.status_code == status, response.text
    assert message in response.text
    assert _job_count(client) == 0
    assert _outbox(client) == []


def test_duplicate_job_name_is_409(client: TestClient, user: dict[str, str]) -> None:
    assert client.post("/jobs", json=_job("same"), headers=user).status_code == 201
    response = client.post("/jobs", json=_job("same"), headers=user)
    assert response.status_code == 409
    assert "same" in response.json()["detail"]


def test_inputs_clashing_on_one_path_are_refused(client: TestClient, user: dict[str, str]) -> None:
    _upload(client, user, "data/other/a.txt", b"different")
    body = _job(attributes={"files_down": {"data_ids": ["set", "other"]}})
    response = client.post("/jobs", json=body, headers=user)
    assert response.status_code == 400
    assert "data/set/a.txt" in response.text and "data/other/a.txt" in response.text


def test_absent_hardware_and_ids_are_treated_as_empty(
    client: TestClient, user: dict[str, str]
) -> None:
    body = _job(attributes={"files_down": {"config_id": None, "data_ids": None}}, hardware=None)
    assert client.post("/jobs", json=body, headers=user).status_code == 201


def test_status_updates_follow_the_state_machine(client: TestClient, user: dict[str, str]) -> None:
    job_id = client.post("/jobs", json=_job(), headers=user).json()["id"]
    key = {"x-api-key": client.app.state.settings.internal_api_key_secret.get_secret_value()}  # type: ignore[attr-defined]

    def put(status: str, details: str | None = None) -> bool:
        response = client.put(
            "/_job_status",
            json={"job_id": job_id, "status": status, "runtime_details": details},
            headers=key,
        )
        assert response.status_code == 200, response.text
        return bool(response.json()["applied"])

    assert put("pulled")
    assert put("running")
    assert not put("running")  # duplicate: no-op
    assert not put("preprocessing")  # backwards: no-op
    assert put("finished")
    assert not put("error", "late")  # terminal never changes
    job = client.get(f"/jobs/{job_id}", headers=user).json()
    assert job["status"] == "finished"
    assert job["date_started"] is not None and job["date_finished"] is not None
    unknown = client.put("/_job_status", json={"job_id": 999, "status": "running"}, headers=key)
    assert unknown.status_code == 404


def test_cancel_and_delete(client: TestClient, user: dict[str, str]) -> None:
    job_id = client.post("/jobs", json=_job(), headers=user).json()["id"]
    canceled = client.post(f"/jobs/{job_id}/cancel", headers=user)
    assert canceled.json()["status"] == "canceled"
    # The worker API never saw the job: the enqueue is withdrawn, no cancel is sent.
    assert _outbox(client) == []
    assert client.delete(f"/jobs/{job_id}", headers=user).status_code == 204
    assert client.get(f"/jobs/{job_id}", headers=user).status_code == 404
    assert client.delete(f"/jobs/{job_id}", headers=user).status_code == 404


def test_other_users_job_is_404(client: TestClient, user: dict[str, str]) -> None:
    job_id = client.post("/jobs", json=_job(), headers=user).json()["id"]
    other = signup(client, "eve@example.org")
    assert client.get(f"/jobs/{job_id}", headers=other).status_code == 404
    assert client.delete(f"/jobs/{job_id}", headers=other).status_code == 404
    assert client.get(f"/jobs/{job_id}", headers=user).status_code == 200


def test_applications_are_listed_without_internal_fields(
    client: TestClient, user: dict[str, str]
) -> None:
    catalog = client.get("/jobs/applications", headers=user)
    assert catalog.status_code == 200
    assert "wordcount" in catalog.text
    assert "image_url" not in catalog.text and "labcloud/demo" not in catalog.text


def test_job_ids_are_never_reused(client: TestClient, user: dict[str, str]) -> None:
    first = client.post("/jobs", json=_job("a"), headers=user).json()["id"]
    assert client.delete(f"/jobs/{first}", headers=user).status_code == 204
    second = client.post("/jobs", json=_job("a"), headers=user).json()["id"]
    assert second > first
