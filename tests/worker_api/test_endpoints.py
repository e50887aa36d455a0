"""The worker API over HTTP, lifespan included: auth, enqueue, pull (long-poll too),
status reports, cancellation, files, the reaper and status delivery to a stand-in
user API on loopback (which also serves the JWKS the tokens are verified with)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from labcloud.contract import Environment, HardwareSpec, JobStatus
from labcloud.db import create_db_engine, make_session_factory, unit_of_work
from tests.waiting import wait_for
from tests.worker_api.conftest import FakeUserApi, queue_job
from worker_api.app import create_app
from worker_api.models import StatusOutbox
from worker_api.queue.service import JobPuller
from worker_api.settings import WorkerApiSettings

KEY = "internal-key-for-tests-0123456789"
INTERNAL = {"x-api-key": KEY}
ClientFactory = Callable[..., TestClient]


@pytest.fixture
def make_client(tmp_path: Path, fake_user_api: FakeUserApi) -> Iterator[ClientFactory]:
    """Start the app (lifespan included) with test settings and ``overrides``."""
    clients: list[TestClient] = []

    def start(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {
            "internal_api_key_secret": KEY,
            "userfacing_api_url": fake_user_api.url,
            "queue_db_url": f"sqlite:///{tmp_path / 'queue.db'}",
            "user_data_root_path": tmp_path / "data",
            "public_url": "http://testserver",
            "reaper_interval_seconds": 0.05,
            "status_forward_poll_seconds": 0.05,
            "status_forward_retry_max_seconds": 0.05,
            "max_wait_seconds": 5,
            **overrides,
        }
        settings = WorkerApiSettings(_env_file=None, **values)
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    try:
        yield start
    finally:
        for client in clients:
            client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    return make_client()


def enqueue(client: TestClient, job_id: int, **options: Any) -> dict[str, Any]:
    response = client.post(
        "/_jobs", json=queue_job(job_id, **options).model_dump(mode="json"), headers=INTERNAL
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def pull(client: TestClient, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    response = client.get("/jobs", params={"memory": 8000, **params}, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def put_status(
    client: TestClient, queue_id: str, status: str, headers: dict[str, str], details: str = ""
) -> int:
    params = {"status": status, **({"runtime_details": details} if details else {})}
    return client.put(f"/jobs/{queue_id}/status", params=params, headers=headers).status_code


# -- access and auth -------------------------------------------------------------------


def test_access_info_local(client: TestClient) -> None:
    response = client.get("/access_info")
    assert response.status_code == 200
    assert response.json() == {
        "cognito": {"user_pool_id": None, "client_id": None, "region": None},
        "auth": "local",
    }


def test_access_info_cognito(make_client: ClientFactory) -> None:
    client = make_client(
        auth="cognito",
        cognito_user_pool_id="eu-central-1_pool",
        cognito_client_id="client",
        cognito_region="eu-central-1",
    )
    assert client.get("/access_info").json() == {
        "cognito": {
            "user_pool_id": "eu-central-1_pool",
            "client_id": "client",
            "region": "eu-central-1",
        },
        "auth": "cognito",
    }


def test_worker_routes_need_a_worker_token(client: TestClient, fake_user_api: FakeUserApi) -> None:
    anonymous = client.get("/jobs", params={"memory": 1})
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    forged = client.get("/jobs", params={"memory": 1}, headers={"Authorization": "Bearer x.y.z"})
    assert forged.status_code == 401
    user = fake_user_api.headers("someone@example.org", "users")
    assert client.get("/jobs", params={"memory": 1}, headers=user).status_code == 403
    assert client.get("/jobs/1/status", headers=user).status_code == 403


def test_internal_routes_need_the_internal_key(client: TestClient) -> None:
    body = queue_job(1).model_dump(mode="json")
    assert client.post("/_jobs", json=body).status_code == 401
    assert client.post("/_jobs", json=body, headers={"x-api-key": "wrong"}).status_code == 401
    assert client.delete("/_jobs/1").status_code == 401


# -- queue ----------------------------------------------------------------------------


def test_enqueue_is_idempotent(client: TestClient) -> None:
    first = enqueue(client, 7)
    assert first["job_id"] == 7
    assert first["status"] == "queued"
    assert enqueue(client, 7, priority=5) == first


def test_enqueue_rejects_invalid_jobs(client: TestClient) -> None:
    body = queue_job(1).model_dump(mode="json")
    body["priority"] = 9
    assert client.post("/_jobs", json=body, headers=INTERNAL).status_code == 422


def test_enqueue_batch_is_one_idempotent_transaction(
    client: TestClient, fake_user_api: FakeUserApi
) -> None:
    enqueue(client, 2)
    body = [queue_job(job_id).model_dump(mode="json") for job_id in (1, 2, 3)]
    response = client.post("/_jobs/batch", json=body, headers=INTERNAL)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert sorted(item["job_id"] for item in answer) == [1, 2, 3]
    assert {item["status"] for item in answer} == {"queued"}
    assert client.post("/_jobs/batch", json=body, headers=INTERNAL).json() == answer
    # Pulled in the order they were sent (job 2 was queued first).
    leased = pull(client, fake_user_api.headers(), limit=10)
    assert [spec["meta"]["job_id"] for spec in leased.values()] == [2, 1, 3]


def test_enqueue_batch_refuses_an_invalid_job_as_a_whole(client: TestClient) -> None:
    body = [queue_job(job_id).model_dump(mode="json") for job_id in (1, 2)]
    body[1]["priority"] = 9
    response = client.post("/_jobs/batch", json=body, headers=INTERNAL)
    assert response.status_code == 422
    assert client.post("/_jobs/batch", json=body[:1], headers=INTERNAL).json()[0]["job_id"] == 1
    too_many = [body[0]] * 501
    assert client.post("/_jobs/batch", json=too_many, headers=INTERNAL).status_code == 422
    assert client.post("/_jobs/batch", json=body[:1]).status_code == 401


def test_pull_validates_its_query(client: TestClient, fake_user_api: FakeUserApi) -> None:
    worker = fake_user_api.headers()
    assert client.get("/jobs", headers=worker).status_code == 422  # memory is required
    for bad in ({"limit": 0}, {"limit": 101}, {"cpu_cores": 0}, {"older_than": -1}):
        response = client.get("/jobs", params={"memory": 1, **bad}, headers=worker)
        assert response.status_code == 422, bad


def test_job_life_cycle(client: TestClient, fake_user_api: FakeUserApi) -> None:
    worker = fake_user_api.headers()
    enqueued = enqueue(client, 1, hardware=None)
    assert pull(client, worker, gpu_memory=4096, groups=["a", "b"]) == {
        str(enqueued["id"]): queue_job(1).job.model_dump(mode="json")
    }
    queue_id = str(enqueued["id"])
    assert pull(client, worker) == {}
    assert client.get(f"/jobs/{queue_id}/status", headers=worker).json() == "pulled"
    for status in ("preprocessing", "running", "running", "postprocessing"):
        assert put_status(client, queue_id, status, worker) == 204
    other = fake_user_api.headers("worker2@example.org")
    assert put_status(client, queue_id, "finished", other) == 404
    assert put_status(client, queue_id, "finished", worker, "exit 0") == 204
    refused = client.put(f"/jobs/{queue_id}/status", params={"status": "running"}, headers=worker)
    assert refused.status_code == 409
    assert "from finished to running" in refused.json()["detail"]
    assert put_status(client, queue_id, "stopped", worker) == 422
    assert client.get(f"/jobs/{queue_id}/status", headers=worker).json() == "finished"
    assert client.get("/jobs/999/status", headers=worker).status_code == 404
    expected = [
        (1, status)
        for status in ("pulled", "preprocessing", "running", "postprocessing", "finished")
    ]
    wait_for(lambda: fake_user_api.acknowledged() == expected)
    assert {key for _code, _body, key in fake_user_api.received} == {KEY}
    assert fake_user_api.received[-1][1]["runtime_details"] == "exit 0"


def test_pull_leases_by_environment_and_hardware(
    client: TestClient, fake_user_api: FakeUserApi
) -> None:
    local_worker = fake_user_api.headers()
    cloud_worker = fake_user_api.headers("cloud1@example.org", "workers", "cloud")
    enqueue(client, 1, environment=Environment.CLOUD)
    enqueue(client, 2, environment=None)
    assert pull(client, local_worker, older_than=3600) == {}
    cloud_jobs = pull(client, cloud_worker, limit=5)
    assert sorted(spec["meta"]["job_id"] for spec in cloud_jobs.values()) == [1, 2]


def test_pull_gives_gpu_jobs_only_to_free_gpus(
    client: TestClient, fake_user_api: FakeUserApi
) -> None:
    worker = fake_user_api.headers()
    enqueue(client, 1, hardware=HardwareSpec(gpu_mem=4096))
    enqueue(client, 2, hardware=HardwareSpec(gpus=2, gpu_model="NVIDIA A10"))
    enqueue(client, 3, hardware=HardwareSpec(memory=1000))

    def job_ids(jobs: dict[str, Any]) -> list[int]:
        return sorted(spec["meta"]["job_id"] for spec in jobs.values())

    # GPU memory but no free GPU: only the CPU job.
    assert job_ids(pull(client, worker, gpu_mem=24000, gpus=0, limit=5)) == [3]
    # The upstream worker's alias, without a count: one GPU is inferred.
    assert job_ids(pull(client, worker, gpu_memory=24000, limit=5)) == [1]
    assert job_ids(pull(client, worker, gpus=2, gpu_mem=24000, gpu_model="NVIDIA T4")) == []
    both = pull(client, worker, gpus=2, gpu_mem=24000, gpu_model="NVIDIA A10")
    assert job_ids(both) == [2]
    assert next(iter(both.values()))["hardware"]["gpus"] == 2
    bad = client.get("/jobs", params={"memory": 1, "gpus": -1}, headers=worker)
    assert bad.status_code == 422


def test_long_poll_returns_as_soon_as_a_job_arrives(
    client: TestClient, fake_user_api: FakeUserApi
) -> None:
    state = client.app.state  # type: ignore[attr-defined]
    # Re-checks so rare that only the wake-up from the enqueue explains a quick answer.
    state.puller = JobPuller(
        state.session_factory,
        state.queue_policy,
        state.queue_signals,
        state.job_wakeup,
        recheck_seconds=60,
    )
    worker = fake_user_api.headers()
    result: dict[str, Any] = {}

    def wait_for_job() -> None:
        result["jobs"] = pull(client, worker, wait=5)
        result["at"] = time.monotonic()

    waiter = threading.Thread(target=wait_for_job)
    waiter.start()
    time.sleep(0.3)
    enqueued_at = time.monotonic()
    enqueue(client, 1)
    waiter.join(timeout=10)
    assert list(result["jobs"]) == [str(1)]
    assert result["at"] - enqueued_at < 1


def test_long_poll_wait_is_capped(make_client: ClientFactory, fake_user_api: FakeUserApi) -> None:
    client = make_client(max_wait_seconds=0.2)
    started = time.monotonic()
    assert pull(client, fake_user_api.headers(), wait=60) == {}
    assert 0.2 <= time.monotonic() - started < 3


def test_cancel(client: TestClient, fake_user_api: FakeUserApi) -> None:
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1)["id"])
    pull(client, worker)
    assert client.delete("/_jobs/1", headers=INTERNAL).status_code == 204
    assert put_status(client, queue_id, "running", worker) == 404
    assert client.get(f"/jobs/{queue_id}/status", headers=worker).json() == "canceled"
    assert client.delete("/_jobs/1", headers=INTERNAL).status_code == 204
    assert client.delete("/_jobs/12345", headers=INTERNAL).status_code == 204
    enqueue(client, 2)
    assert client.delete("/_jobs/2", headers=INTERNAL).status_code == 204
    assert pull(client, worker) == {}


def _log_upload(client: TestClient, queue_id: str, headers: dict[str, str]) -> Any:
    return client.post(
        f"/jobs/{queue_id}/files/url", params={"type": "log", "base_path": ""}, headers=headers
    )


def test_cancel_keeps_the_partial_log_for_a_grace(
    make_client: ClientFactory, fake_user_api: FakeUserApi, tmp_path: Path
) -> None:
    client = make_client(cancel_log_grace_seconds=1)
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1)["id"])
    pull(client, worker)
    assert put_status(client, queue_id, "running", worker) == 204
    cancel = client.delete("/_jobs/1", params={"discard_outputs": "false"}, headers=INTERNAL)
    assert cancel.status_code == 204
    # The run must stop: keep-alives are refused at once ...
    assert put_status(client, queue_id, "running", worker) == 404
    # ... but its last worker may still upload the log, and only the log.
    signed = _log_upload(client, queue_id, worker)
    assert signed.status_code == 201, signed.text
    stored = client.request(**signed.json(), files={"file": ("log.txt", b"partial\n")})
    assert stored.status_code == 201, stored.text
    assert (tmp_path / "data/u1/log/job1/log.txt").read_bytes() == b"partial\n"
    direct = client.post(
        f"/jobs/{queue_id}/files/upload",
        params={"type": "log"},
        files={"file": ("tool.log", b"more\n")},
        headers=worker,
    )
    assert direct.status_code == 201, direct.text
    assert (tmp_path / "data/u1/log/job1/tool.log").read_bytes() == b"more\n"
    output = client.post(
        f"/jobs/{queue_id}/files/url",
        params={"type": "output", "base_path": "x"},
        headers=worker,
    )
    assert output.status_code == 404
    assert (
        _log_upload(client, queue_id, fake_user_api.headers("worker2@example.org")).status_code
        == 404
    )
    # The grace ends, and so do the upload URLs handed out during it.
    late = _log_upload(client, queue_id, worker).json()
    time.sleep(2.1)
    assert _log_upload(client, queue_id, worker).status_code == 404
    assert client.request(**late, files={"file": ("log.txt", b"late")}).status_code == 403
    assert (tmp_path / "data/u1/log/job1/log.txt").read_bytes() == b"partial\n"
    assert client.get(f"/jobs/{queue_id}/status", headers=worker).json() == "canceled"


def test_deleting_a_job_allows_no_upload(client: TestClient, fake_user_api: FakeUserApi) -> None:
    worker = fake_user_api.headers()
    first = str(enqueue(client, 1)["id"])
    second = str(enqueue(client, 2)["id"])
    pull(client, worker, limit=2)
    assert (
        client.delete("/_jobs/1", params={"discard_outputs": "true"}, headers=INTERNAL).status_code
        == 204
    )
    assert _log_upload(client, first, worker).status_code == 404
    # Cancelled first (log kept), then deleted: the deletion wins.
    assert client.delete("/_jobs/2", headers=INTERNAL).status_code == 204
    assert _log_upload(client, second, worker).status_code == 201
    assert (
        client.delete("/_jobs/2", params={"discard_outputs": "true"}, headers=INTERNAL).status_code
        == 204
    )
    assert _log_upload(client, second, worker).status_code == 404


def test_health_needs_no_token(client: TestClient) -> None:
    response = client.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_reaper_fails_a_job_whose_worker_went_silent(
    make_client: ClientFactory, fake_user_api: FakeUserApi
) -> None:
    client = make_client(timeout_failure=0.2, max_retries=0)
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1)["id"])
    pull(client, worker)
    wait_for(lambda: (1, "error") in fake_user_api.acknowledged())
    assert put_status(client, queue_id, "running", worker) == 404
    error = fake_user_api.received[-1][1]
    assert error["runtime_details"] == (
        "worker worker1@example.org sent no keep-alive for 0.2 s "
        "(attempt 1 of 1, pulled); giving up"
    )


def test_a_silent_workers_job_is_retried_on_another_worker_then_failed(
    make_client: ClientFactory, fake_user_api: FakeUserApi
) -> None:
    client = make_client(timeout_failure=0.3, max_retries=1, retry_different=True)
    first, second = fake_user_api.headers(), fake_user_api.headers("worker2@example.org")
    queue_id = str(enqueue(client, 1)["id"])
    assert list(pull(client, first)) == [queue_id]
    wait_for(lambda: (1, "queued") in fake_user_api.acknowledged())
    # RETRY_DIFFERENT: the worker that went silent does not get the job back.
    assert pull(client, first) == {}
    assert list(pull(client, second)) == [queue_id]
    assert put_status(client, queue_id, "running", first) == 404
    wait_for(lambda: (1, "error") in fake_user_api.acknowledged())
    assert fake_user_api.acknowledged() == [
        (1, "pulled"),
        (1, "queued"),
        (1, "pulled"),
        (1, "error"),
    ]
    details = [body["runtime_details"] for _code, body, _key in fake_user_api.received]
    assert details[1] == (
        "worker worker1@example.org sent no keep-alive for 0.3 s (attempt 1 of 2, pulled); "
        "re-queued for attempt 2 of 2"
    )
    assert details[-1] == (
        "worker worker2@example.org sent no keep-alive for 0.3 s "
        "(attempt 2 of 2, pulled); giving up"
    )
    assert put_status(client, queue_id, "running", second) == 404


def test_keep_alive_holds_the_lease(make_client: ClientFactory, fake_user_api: FakeUserApi) -> None:
    client = make_client(timeout_failure=1)
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1)["id"])
    pull(client, worker)
    # Half again as long as the lease, with keep-alives well inside it.
    for _ in range(5):
        time.sleep(0.3)
        assert put_status(client, queue_id, "pulled", worker) == 204
    assert client.get(f"/jobs/{queue_id}/status", headers=worker).json() == "pulled"


def test_statuses_survive_a_user_api_outage_and_a_restart(
    make_client: ClientFactory, fake_user_api: FakeUserApi, tmp_path: Path
) -> None:
    fake_user_api.answers = [503] * 1000
    client = make_client()
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1)["id"])
    pull(client, worker)
    assert put_status(client, queue_id, "running", worker) == 204
    wait_for(lambda: len(fake_user_api.received) >= 3)  # retried, never acknowledged
    client.__exit__(None, None, None)

    engine = create_db_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    with unit_of_work(make_session_factory(engine)) as session:
        kept = [row.status for row in session.scalars(select(StatusOutbox))]
    engine.dispose()
    assert kept == [JobStatus.PULLED, JobStatus.RUNNING]

    with fake_user_api.lock:
        fake_user_api.answers = []
    make_client()
    wait_for(lambda: fake_user_api.acknowledged() == [(1, "pulled"), (1, "running")])


# -- files ----------------------------------------------------------------------------


@pytest.fixture
def held_job(client: TestClient, fake_user_api: FakeUserApi, tmp_path: Path) -> str:
    """A job leased to worker1 whose input ``u1/data/run/a.txt`` exists."""
    source = tmp_path / "data" / "u1" / "data" / "run" / "a.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"input bytes")
    (tmp_path / "data" / "u1" / "data" / "secret.txt").write_bytes(b"not yours")
    queue_id = str(enqueue(client, 1, files_down={"data/a.txt": "u1/data/run/a.txt"})["id"])
    assert list(pull(client, fake_user_api.headers())) == [queue_id]
    return queue_id


def test_download_inputs_of_held_jobs_only(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str
) -> None:
    worker = fake_user_api.headers()
    signed = client.get("/files/u1/data/run/a.txt/url", headers=worker)
    assert signed.status_code == 200
    request = signed.json()
    assert set(request) == {"method", "url", "headers", "data"}
    assert request["url"].startswith("http://testserver/_signed/")
    assert client.request(**request).content == b"input bytes"
    direct = client.get("/files/u1/data/run/a.txt/download", headers=worker)
    assert (direct.status_code, direct.content) == (200, b"input bytes")

    for uri in ("u1/data/secret.txt", "u1/data/run/../secret.txt", "u1/data/run"):
        assert client.get(f"/files/{uri}/url", headers=worker).status_code == 404, uri
        assert client.get(f"/files/{uri}/download", headers=worker).status_code == 404, uri
    other = fake_user_api.headers("worker2@example.org")
    assert client.get("/files/u1/data/run/a.txt/url", headers=other).status_code == 404
    assert client.get("/files/u1/data/run/a.txt/download", headers=other).status_code == 404

    tampered = request["url"][:-2] + ("AA" if not request["url"].endswith("AA") else "BB")
    assert client.get(tampered).status_code == 403
    assert client.post(request["url"], files={"file": ("a", b"x")}).status_code == 403

    assert put_status(client, held_job, "finished", worker) == 204
    assert client.get("/files/u1/data/run/a.txt/url", headers=worker).status_code == 404


def test_upload_results_of_held_jobs_only(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path
) -> None:
    worker = fake_user_api.headers()
    signed = client.post(
        f"/jobs/{held_job}/files/url",
        params={"type": "output", "base_path": "sub"},
        headers=worker,
    )
    assert signed.status_code == 201, signed.text
    request = signed.json()
    assert set(request) == {"method", "url", "headers", "data"}
    uploaded = client.request(**request, files={"file": ("result.txt", b"result")})
    assert uploaded.status_code == 201, uploaded.text
    assert (tmp_path / "data/u1/output/job1/sub/result.txt").read_bytes() == b"result"
    assert client.get(request["url"]).status_code == 403  # an upload URL does not download

    direct = client.post(
        f"/jobs/{held_job}/files/upload",
        params={"type": "log"},
        files={"file": ("run.log", b"log line\n")},
        headers=worker,
    )
    assert direct.status_code == 201, direct.text
    assert direct.json() == {
        "path": "run.log",
        "size": 9,
        "files": [{"path": "run.log", "size": 9}],
    }
    assert (tmp_path / "data/u1/log/job1/run.log").read_bytes() == b"log line\n"

    escape = client.post(
        f"/jobs/{held_job}/files/url",
        params={"type": "output", "base_path": "../../data/x"},
        headers=worker,
    )
    assert escape.status_code == 400
    assert (
        client.post(
            f"/jobs/{held_job}/files/url",
            params={"type": "config", "base_path": "x"},
            headers=worker,
        ).status_code
        == 422
    )
    missing_field = client.post(
        f"/jobs/{held_job}/files/upload",
        params={"type": "log", "base_path": "x"},
        files={"other": ("x", b"x")},
        headers=worker,
    )
    assert missing_field.status_code == 400

    other = fake_user_api.headers("worker2@example.org")
    for route in ("url", "upload"):
        response = client.post(
            f"/jobs/{held_job}/files/{route}",
            params={"type": "output", "base_path": "x"},
            files={"file": ("x", b"x")},
            headers=other,
        )
        assert response.status_code == 404, route
    assert not (tmp_path / "data/u1/output/job1/x").exists()


def _decode_worker_put_file(
    client: TestClient,
    queue_id: str,
    headers: dict[str, str],
    kind: str,
    path_api: str,
    body: bytes,
) -> Any:
    """Upload one result as DECODE's worker (v0.3.0, ``JobAPI.put_file``) does: one
    URL per file with ``base_path`` = the file's folder relative to the ``files_up``
    root, then the request it got, as keyword arguments, with the part named after
    the file."""
    folder, _, name = path_api.rpartition("/")
    response = client.post(
        f"/jobs/{queue_id}/files/url", params={"base_path": folder, "type": kind}, headers=headers
    )
    assert response.status_code == 201, response.text
    return client.request(**response.json(), files={"file": (name, body)})


def test_base_path_is_a_folder_as_decode_workers_upload(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path
) -> None:
    worker = fake_user_api.headers()
    results = {
        "emitter.h5": b"emitters",
        "model.pt": b"weights",
        "plots/loss.png": b"png",
        "plots/deep/er/trace.csv": b"1,2",
    }
    for path_api, body in results.items():
        answer = _decode_worker_put_file(client, held_job, worker, "output", path_api, body)
        assert answer.status_code == 201, answer.text
    stored = tmp_path / "data/u1/output/job1"
    assert {
        p.relative_to(stored).as_posix(): p.read_bytes() for p in stored.rglob("*") if p.is_file()
    } == results
    # The default base_path is the location itself; the direct route means the same.
    default = client.post(f"/jobs/{held_job}/files/url", params={"type": "log"}, headers=worker)
    assert default.status_code == 201, default.text
    assert client.request(**default.json(), files={"file": ("log.txt", b"l")}).status_code == 201
    direct = client.post(
        f"/jobs/{held_job}/files/upload",
        params={"type": "artifact", "base_path": "a/b"},
        files={"file": ("c.bin", b"c")},
        headers=worker,
    )
    assert direct.status_code == 201, direct.text
    assert direct.json()["path"] == "a/b/c.bin"
    assert (tmp_path / "data/u1/log/job1/log.txt").read_bytes() == b"l"
    assert (tmp_path / "data/u1/artifact/job1/a/b/c.bin").read_bytes() == b"c"


@pytest.mark.parametrize(
    "name", ["", "../escape.txt", "a\\b.txt", "bad\nname", ".labcloud-partial-x", "n" * 256]
)
def test_a_missing_or_unsafe_part_name_is_refused(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path, name: str
) -> None:
    worker = fake_user_api.headers()
    signed = client.post(f"/jobs/{held_job}/files/url", params={"type": "output"}, headers=worker)
    refused = client.request(**signed.json(), files={"file": (name, b"x")})
    assert refused.status_code in (400, 422), refused.text
    direct = client.post(
        f"/jobs/{held_job}/files/upload",
        params={"type": "output"},
        files={"file": (name, b"x")},
        headers=worker,
    )
    assert direct.status_code in (400, 422), direct.text
    assert not (tmp_path / "data/u1/output").exists()
    # A refused upload does not use the URL up.
    assert client.request(**signed.json(), files={"file": ("ok.txt", b"x")}).status_code == 201


def test_several_parts_in_one_upload_are_all_stored_or_all_refused(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path
) -> None:
    worker = fake_user_api.headers()
    parts = [("file", ("a.txt", b"A")), ("file", ("sub/b.txt", b"BB"))]
    direct = client.post(
        f"/jobs/{held_job}/files/upload",
        params={"type": "output", "base_path": "run"},
        files=parts,
        headers=worker,
    )
    assert direct.status_code == 201, direct.text
    assert direct.json() == {
        "path": "run",
        "size": 3,
        "files": [{"path": "run/a.txt", "size": 1}, {"path": "run/sub/b.txt", "size": 2}],
    }
    signed = client.post(f"/jobs/{held_job}/files/url", params={"type": "log"}, headers=worker)
    stored = client.request(**signed.json(), files=parts)
    assert stored.status_code == 201, stored.text
    assert (tmp_path / "data/u1/output/job1/run/sub/b.txt").read_bytes() == b"BB"
    assert (tmp_path / "data/u1/log/job1/a.txt").read_bytes() == b"A"
    assert (tmp_path / "data/u1/log/job1/sub/b.txt").read_bytes() == b"BB"

    for refused_parts in (
        [("file", ("c.txt", b"1")), ("file", ("c.txt", b"2"))],  # the same name twice
        [("file", ("d", b"1")), ("file", ("d/e.txt", b"2"))],  # a file and its folder
        [("file", ("f.txt", b"1")), ("file", ("", b"2"))],  # a part without a name
        [("file", (f"g{i}.txt", b"x")) for i in range(101)],  # over the bound
    ):
        refused = client.post(
            f"/jobs/{held_job}/files/upload",
            params={"type": "artifact"},
            files=refused_parts,
            headers=worker,
        )
        assert refused.status_code in (400, 422), refused.text
    assert not (tmp_path / "data/u1/artifact").exists()


def test_an_upload_url_is_good_for_one_upload(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path
) -> None:
    worker = fake_user_api.headers()
    signed = client.post(
        f"/jobs/{held_job}/files/url", params={"type": "output"}, headers=worker
    ).json()
    assert client.request(**signed, files={"file": ("r.txt", b"first")}).status_code == 201
    again = client.request(**signed, files={"file": ("r.txt", b"second")})
    assert again.status_code == 403
    assert "already been used" in again.json()["detail"]
    assert (tmp_path / "data/u1/output/job1/r.txt").read_bytes() == b"first"
    # Each URL asked for is a new one.
    fresh = client.post(f"/jobs/{held_job}/files/url", params={"type": "output"}, headers=worker)
    assert client.request(**fresh.json(), files={"file": ("r.txt", b"2nd")}).status_code == 201


def test_signed_urls_stop_working_when_their_owner_is_disabled(
    make_client: ClientFactory, fake_user_api: FakeUserApi, tmp_path: Path
) -> None:
    client = make_client(account_check_ttl_seconds=0)
    source = tmp_path / "data/u1/data/a.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"input")
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1, files_down={"data/a.txt": "u1/data/a.txt"})["id"])
    pull(client, worker)
    download = client.get("/files/u1/data/a.txt/url", headers=worker).json()
    upload = client.post(
        f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker
    ).json()
    assert client.request(**download).content == b"input"

    fake_user_api.accounts["u1"] = {"active": False, "max_storage_bytes": None}
    refused_download = client.request(**download)
    assert refused_download.status_code == 403
    assert "disabled" in refused_download.json()["detail"]
    refused_upload = client.request(**upload, files={"file": ("r.txt", b"x")})
    assert refused_upload.status_code == 403
    assert not (tmp_path / "data/u1/output").exists()


def test_results_count_against_the_owners_storage_limit(
    make_client: ClientFactory, fake_user_api: FakeUserApi, tmp_path: Path
) -> None:
    client = make_client(account_check_ttl_seconds=0)
    own = tmp_path / "data/u1/data/mine.bin"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"m" * 600)
    fake_user_api.accounts["u1"] = {"active": True, "max_storage_bytes": 1000}
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1)["id"])
    pull(client, worker)
    fits = client.post(f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker)
    assert client.request(**fits.json(), files={"file": ("a.bin", b"a" * 300)}).status_code == 201
    over = client.post(f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker)
    refused = client.request(**over.json(), files={"file": ("b.bin", b"b" * 300)})
    assert refused.status_code == 413
    assert "storage limit reached" in refused.json()["detail"]
    direct = client.post(
        f"/jobs/{queue_id}/files/upload",
        params={"type": "output"},
        files={"file": ("b.bin", b"b" * 300)},
        headers=worker,
    )
    assert direct.status_code == 413
    assert not (tmp_path / "data/u1/output/job1/b.bin").exists()
    # The log still fits (a small allowance beyond the limit), so the job can say why.
    log = client.post(f"/jobs/{queue_id}/files/url", params={"type": "log"}, headers=worker)
    assert client.request(**log.json(), files={"file": ("log.txt", b"l" * 500)}).status_code == 201
    # Once space is freed, the refused URL works: a refusal does not use it up.
    own.unlink()
    (tmp_path / "data/u1/log/job1/log.txt").unlink()
    assert client.request(**over.json(), files={"file": ("b.bin", b"b" * 300)}).status_code == 201
