from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from labcloud.contract import QueueJob
from labcloud.storage.base import Entry, Storage
from tests.user_api.helpers import login, signup
from user_api.jobs.resolvers import catalog as catalog_resolver
from user_api.jobs.schemas import MAX_INPUT_IDS
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
        # Beyond any machine: such a job could never be placed and waited forever.
        ({"hardware": {"cpu_cores": 1_000_000_000}}, 422, "cpu_cores"),
        ({"hardware": {"memory": 2**63}}, 422, "memory"),
        ({"hardware": {"gpu_mem": 10**30}}, 422, "gpu_mem"),
        ({"hardware": {"gpus": 1000}}, 422, "gpus"),
        ({"hardware": {"gpu_model": "x" * 1000}}, 422, "gpu_model"),
        # A NUL cannot be passed in a process environment: the job failed at its start.
        ({"attributes": {"env_vars": {"WORDCOUNT_PATTERN": "a\u0000b"}}}, 422, "NUL"),
        ({"attributes": {"env_vars": {"WORDCOUNT_PATTERN": "x" * 70_000}}}, 422, "env_vars"),
        ({"attributes": {"env_vars": {f"K{i}": "v" for i in range(101)}}}, 422, "env_vars"),
        (
            {"attributes": {"files_down": {"data_ids": ["a"] * (MAX_INPUT_IDS + 1)}}},
            422,
            "data_ids",
        ),
        ({"attributes": {"files_down": {"config_id": "c" * 2000}}}, 422, "config_id"),
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


def test_applications_are_served_in_decode_s_nesting(
    client: TestClient, user: dict[str, str]
) -> None:
    # DECODE's job form reads catalog[application][version][entrypoint].app.env.
    catalog = client.get("/jobs/applications", headers=user).json()
    wordcount = catalog["demo"]["latest"]["wordcount"]
    assert wordcount["app"] == {"env": ["WORDCOUNT_PATTERN"]}
    assert wordcount["handler"]["files_down"] == {
        "config_id": "config",
        "data_ids": "data",
        "artifact_ids": "artifact",
    }
    assert wordcount["handler"]["files_up"] == {
        "output": "output",
        "log": "log",
        "artifact": "artifact",
    }
    assert wordcount["aws_resources"] == {
        "hardware": {"MEMORY": 64, "VCPU": 1, "GPU": 0},
        "timeout": 600,
    }
    confined = catalog["testing"]["1.0"]["confined"]
    assert confined["description"] == "Prints its user and group ids in a confined container."
    assert "container" not in confined and "cmd" not in confined["app"]


def test_decode_s_job_form_is_accepted(client: TestClient, user: dict[str, str]) -> None:
    # The body DECODE's web frontend sends when the optional fields are left empty.
    body = {
        "job_name": "from-the-form",
        "environment": None,
        "priority": None,
        "application": {"application": "demo", "version": "latest", "entrypoint": "wordcount"},
        "attributes": {
            "files_down": {"config_id": None, "data_ids": ["set"], "artifact_ids": []},
            "env_vars": {},
        },
        "hardware": {
            "cpu_cores": None,
            "memory": None,
            "gpu_model": None,
            "gpu_archi": None,
            "gpu_mem": None,
        },
    }
    response = client.post("/jobs", json=body, headers=user)
    assert response.status_code == 201, response.text
    assert response.json()["priority"] == 0
    [message] = _outbox(client)
    assert QueueJob.model_validate(message.payload).priority == 0
    nothing = _job("no-inputs", attributes={"files_down": None, "env_vars": None})
    assert client.post("/jobs", json=nothing, headers=user).status_code == 201


def test_container_options_of_the_entrypoint_reach_the_job_spec(
    client: TestClient, user: dict[str, str]
) -> None:
    body = _job(
        "confined",
        application={"application": "testing", "version": "1.0", "entrypoint": "confined"},
        attributes={},
    )
    assert client.post("/jobs", json=body, headers=user).status_code == 201
    [message] = _outbox(client)
    container = QueueJob.model_validate(message.payload).job.container
    assert (container.pids_limit, container.user, container.read_only_root) == (
        32,
        "65534:65534",
        True,
    )


def test_a_job_whose_result_folder_holds_the_user_s_files_is_refused(
    client: TestClient, user: dict[str, str]
) -> None:
    # Deleting job "mymodel" used to remove the weights uploaded to artifact/mymodel/.
    _upload(client, user, "artifact/mymodel/weights.bin", b"weights")
    response = client.post("/jobs", json=_job("mymodel"), headers=user)
    assert response.status_code == 409, response.text
    assert "artifact/mymodel/" in response.json()["detail"]
    assert _job_count(client) == 0 and _outbox(client) == []
    weights = client.get("/files/artifact/mymodel/weights.bin/download", headers=user)
    assert weights.content == b"weights"
    # Another name works, and deleting that job leaves the user's folder alone.
    job_id = client.post("/jobs", json=_job("mymodel-2"), headers=user).json()["id"]
    assert client.delete(f"/jobs/{job_id}", headers=user).status_code == 204
    weights = client.get("/files/artifact/mymodel/weights.bin/download", headers=user)
    assert weights.content == b"weights"


def test_a_job_s_artifact_folder_takes_no_user_files_while_the_job_exists(
    client: TestClient, user: dict[str, str]
) -> None:
    """Files put into artifact/<job>/ after the job was created would be deleted with
    the job: every way of writing there is refused while the job exists."""
    job_id = client.post("/jobs", json=_job("mymodel"), headers=user).json()["id"]
    _upload(client, user, "data/weights.bin", b"weights")
    refused = [
        client.post(
            "/files/artifact/mymodel/upload", files={"file": ("w.bin", b"w")}, headers=user
        ),
        client.post(
            "/files/artifact/upload", files={"file": ("mymodel/w.bin", b"w")}, headers=user
        ),
        client.post("/files/artifact/mymodel/sub/url", headers=user),
        client.post("/files/artifact/mymodel/sub/", headers=user),
        client.put(
            "/files/data/weights.bin", json={"path": "artifact/mymodel/w.bin"}, headers=user
        ),
    ]
    for response in refused:
        assert response.status_code == 409, response.text
        assert "holds the results of your job 'mymodel'" in response.json()["detail"]
    # A signed upload URL for artifact/ cannot put a part there either.
    signed = client.post("/files/artifact/url", headers=user).json()
    through_url = client.post(signed["url"], files={"file": ("mymodel/w.bin", b"w")})
    assert through_url.status_code == 409, through_url.text
    assert client.get("/files/artifact/mymodel", headers=user).status_code == 404
    # A similar name is another folder; once the job is deleted its name is free.
    assert (
        client.post(
            "/files/artifact/mymodel-2/upload", files={"file": ("w.bin", b"w")}, headers=user
        ).status_code
        == 201
    )
    assert client.delete(f"/jobs/{job_id}", headers=user).status_code == 204
    assert (
        client.post(
            "/files/artifact/mymodel/upload", files={"file": ("w.bin", b"w")}, headers=user
        ).status_code
        == 201
    )


def _internal_key(client: TestClient) -> dict[str, str]:
    key = client.app.state.settings.internal_api_key_secret.get_secret_value()  # type: ignore[attr-defined]
    return {"x-api-key": key}


def test_jobs_are_filtered_by_status(client: TestClient, user: dict[str, str]) -> None:
    ids = [client.post("/jobs", json=_job(f"j{i}"), headers=user).json()["id"] for i in range(3)]
    for job_id, status in ((ids[0], "error"), (ids[1], "running")):
        client.put(
            "/_job_status", json={"job_id": job_id, "status": status}, headers=_internal_key(client)
        )

    def listed(*statuses: str) -> list[int]:
        response = client.get("/jobs", params={"status": list(statuses)}, headers=user)
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()]

    assert listed("error") == [ids[0]]
    assert listed("error", "queued") == [ids[2], ids[0]]
    assert listed() == ids[::-1]
    refused = client.get("/jobs", params={"status": "done"}, headers=user)
    assert refused.status_code == 422 and "status" in refused.text


def test_cancelling_a_job_that_ended_is_409(client: TestClient, user: dict[str, str]) -> None:
    job_id = client.post("/jobs", json=_job(), headers=user).json()["id"]
    client.put(
        "/_job_status", json={"job_id": job_id, "status": "finished"}, headers=_internal_key(client)
    )
    response = client.post(f"/jobs/{job_id}/cancel", headers=user)
    assert response.status_code == 409, response.text
    assert "finished" in response.json()["detail"]
    assert client.get(f"/jobs/{job_id}", headers=user).json()["status"] == "finished"
    admin = login(client, "admin@example.org")
    response = client.post(f"/admin/jobs/{job_id}/cancel", headers=admin)
    assert response.status_code == 409, response.text
    assert "finished" in response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/9223372036854775808",
        "/jobs/99999999999999999999999999",
        "/jobs/9223372036854775808/cancel",
        "/jobs?limit=99999999999999999999",
        "/jobs?offset=9223372036854775808",
        "/jobs?offset=-1",
    ],
)
def test_integers_beyond_64_bits_are_refused(
    client: TestClient, user: dict[str, str], path: str
) -> None:
    method = "POST" if path.endswith("cancel") else "GET"
    response = client.request(method, path, headers=user)
    assert response.status_code in (404, 422), response.text


@pytest.mark.parametrize("path", ["/jobs/%FF", "/files/data/%C0%AE%C0%AE/x", "/jobs?status=%FF"])
def test_urls_that_are_not_utf_8_are_refused(
    client: TestClient, user: dict[str, str], path: str
) -> None:
    response = client.get(path, headers=user)
    assert response.status_code == 400, response.text
    assert "UTF-8" in response.json()["detail"]


def test_a_request_body_over_the_limit_is_413(client: TestClient, user: dict[str, str]) -> None:
    # Within every per-field limit, but over the body limit as a whole.
    body = _job(attributes={"env_vars": {f"K{i}": "v" * 60_000 for i in range(30)}})
    response = client.post("/jobs", json=body, headers=user)
    assert response.status_code == 413, response.text
    assert "Request limits" in response.json()["detail"]
    assert _job_count(client) == 0


def test_inputs_expanding_to_too_many_files_are_413(
    client: TestClient, user: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_resolver, "MAX_INPUT_FILES", 2)
    response = client.post("/jobs", json=_job(), headers=user)  # data/set holds 2 files
    assert response.status_code == 201, response.text
    body = _job("more", attributes={"files_down": {"data_ids": ["set", "single.txt"]}})
    response = client.post("/jobs", json=body, headers=user)
    assert response.status_code == 413, response.text
    assert "more than 2 files" in response.json()["detail"]


class _GatedStorage:
    """The app's real storage, whose ``stat`` of one key waits until released: a
    submission held while its inputs are checked."""

    def __init__(self, inner: Storage, gated_suffix: str) -> None:
        self._inner = inner
        self._gated_suffix = gated_suffix
        self.entered = threading.Event()
        self.release = threading.Event()

    def stat(self, key: str) -> Entry | None:
        if key.endswith(self._gated_suffix):
            self.entered.set()
            assert self.release.wait(60), "never released"
        return self._inner.stat(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def gated(client: TestClient) -> Iterator[_GatedStorage]:
    app = client.app
    real: Storage = app.state.storage  # type: ignore[attr-defined]
    storage = _GatedStorage(real, "/data/single.txt")
    app.state.storage = storage  # type: ignore[attr-defined]
    yield storage
    storage.release.set()
    app.state.storage = real  # type: ignore[attr-defined]


def test_other_users_write_while_a_submission_is_checked(
    client: TestClient, user: dict[str, str], gated: _GatedStorage
) -> None:
    # A submission used to hold the database's write lock (SQLite) from its first
    # statement while its inputs were looked up in storage: 150,000 data_ids locked
    # every other writer out for 41 s.
    other = signup(client, "bob@example.org")
    ids = ["set"] * 500 + ["single.txt"]  # the gate is on the last look-up
    results: dict[str, Any] = {}

    def submit_big() -> None:
        body = _job("big", attributes={"files_down": {"data_ids": ids}})
        results["big"] = client.post("/jobs", json=body, headers=user)

    thread = threading.Thread(target=submit_big)
    thread.start()
    try:
        assert gated.entered.wait(60), "the submission never reached its input check"
        small = _job(
            "small",
            application={"application": "testing", "version": "1.0", "entrypoint": "noop"},
            attributes={},
        )
        done = threading.Event()

        def submit_small() -> None:
            results["small"] = client.post("/jobs", json=small, headers=other)
            done.set()

        threading.Thread(target=submit_small, daemon=True).start()
        # Generous, yet shorter than SQLite's 30 s busy timeout that the stalled
        # write used to wait for before failing.
        assert done.wait(25), "another user's write waited for the submission"
        assert results["small"].status_code == 201, results["small"].text
        assert thread.is_alive()  # the big submission is still being checked
    finally:
        gated.release.set()
        thread.join(60)
    assert results["big"].status_code == 201, results["big"].text
