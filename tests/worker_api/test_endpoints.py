"""The worker API over HTTP, lifespan included: auth, enqueue, pull (long-poll too),
status reports, cancellation, the reaper and status delivery to a stand-in user API
on loopback (which also serves the JWKS the tokens are verified with). The files
routes are tests/worker_api/test_files.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from labcloud.contract import Environment, HardwareSpec, JobStatus
from labcloud.db import create_db_engine, make_session_factory, unit_of_work
from tests.waiting import wait_for
from tests.worker_api.conftest import (
    INTERNAL,
    KEY,
    ClientFactory,
    FakeUserApi,
    app_clients,
    enqueue,
    pull,
    queue_job,
)
from worker_api.models import StatusOutbox
from worker_api.queue.service import JobPuller


@pytest.fixture
def make_client(tmp_path: Path, fake_user_api: FakeUserApi) -> Iterator[ClientFactory]:
    """Start the app (lifespan included) with test settings and ``overrides``."""
    yield from app_clients(
        tmp_path, fake_user_api, reaper_interval_seconds=0.05, max_wait_seconds=5
    )


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    return make_client()


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


def _outboxed(client: TestClient) -> list[tuple[str, dict[str, Any] | None]]:
    """(status, outcome) of the status changes not yet delivered."""
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with unit_of_work(factory) as session:
        rows = session.scalars(select(StatusOutbox).order_by(StatusOutbox.id)).all()
        return [(row.status.value, row.outcome) for row in rows]


def test_a_status_report_may_carry_the_outcome(
    make_client: ClientFactory, fake_user_api: FakeUserApi
) -> None:
    # The user API is down, so the outbox keeps what it would be told.
    fake_user_api.answers.extend([503] * 1000)
    client = make_client()
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1)["id"])
    pull(client, worker)
    url = f"/jobs/{queue_id}/status"
    outcome = {"exit_code": 3, "failure": "user_error", "attempt": 5, "log_tail": "boom"}
    # A non-terminal status carries no outcome to the user API.
    running = client.put(
        url, params={"status": "running"}, json={"outcome": outcome}, headers=worker
    )
    assert running.status_code == 204, running.text
    wrong = {"outcome": {"exit_code": "three", "failure": "bad luck"}}
    refused = client.put(url, params={"status": "error"}, json=wrong, headers=worker)
    assert refused.status_code == 422
    assert "outcome.exit_code" in refused.json()["detail"]
    assert "outcome.failure" in refused.json()["detail"]
    not_json = client.put(
        url,
        params={"status": "error"},
        content=b"{",
        headers={**worker, "content-type": "application/json"},
    )
    assert not_json.status_code == 422
    assert "invalid status report body" in not_json.json()["detail"]
    huge = {"outcome": {"exit_code": 1}, "padding": "x" * 70_000}
    assert client.put(url, params={"status": "error"}, json=huge, headers=worker).status_code == 413
    assert client.get(url, headers=worker).json() == "running"  # nothing refused was applied
    ended = client.put(url, params={"status": "error"}, json={"outcome": outcome}, headers=worker)
    assert ended.status_code == 204, ended.text
    # The attempt is the worker API's count: this is the job's first lease.
    assert _outboxed(client) == [
        ("pulled", None),
        ("running", None),
        ("error", {"exit_code": 3, "failure": "user_error", "attempt": 1, "log_tail": "boom"}),
    ]
    body = client.app.openapi()["paths"]["/jobs/{queue_id}/status"]["put"]["requestBody"]  # type: ignore[attr-defined]
    schema = body["content"]["application/json"]["schema"]
    assert "$ref" not in str(schema)
    assert "user_error" in str(schema["properties"]["outcome"])


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
