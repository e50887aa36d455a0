"""Why a queued job waits (GET /_jobs/{job_id}/waiting) and the connected workers
(GET /_workers), from real pulls and keep-alives of the worker API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete
from sqlalchemy.orm import Session

from labcloud.contract import Environment, HardwareSpec
from labcloud.db import make_session_factory, utcnow
from tests.waiting import wait_for
from tests.worker_api.conftest import (
    INTERNAL,
    ClientFactory,
    FakeUserApi,
    app_clients,
    enqueue,
    pull,
)
from worker_api.models import ConnectedWorker
from worker_api.queue.schemas import WorkerOffer
from worker_api.workers import presence


@pytest.fixture
def make_client(tmp_path: Path, fake_user_api: FakeUserApi) -> Iterator[ClientFactory]:
    yield from app_clients(tmp_path, fake_user_api, reaper_interval_seconds=0.05)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    return make_client()


def waiting(client: TestClient, job_id: int) -> dict[str, Any] | None:
    response = client.get(f"/_jobs/{job_id}/waiting", headers=INTERNAL)
    assert response.status_code == 200, response.text
    body: dict[str, Any] | None = response.json()
    return body


def workers(client: TestClient) -> list[dict[str, Any]]:
    response = client.get("/_workers", headers=INTERNAL)
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


def test_the_routes_need_the_internal_key(client: TestClient) -> None:
    assert client.get("/_workers").status_code in (401, 403)
    assert client.get("/_jobs/1/waiting", headers={"x-api-key": "wrong"}).status_code in (401, 403)


def test_no_worker_connected(client: TestClient, fake_user_api: FakeUserApi) -> None:
    enqueue(client, 1)
    answer = waiting(client, 1)
    assert answer is not None
    assert answer["reason"] == "no_worker"
    assert answer["message"] == "No worker for environment local is connected."
    assert answer["position"] is None and answer["attempt"] is None
    # A cloud worker does not take local jobs.
    pull(client, fake_user_api.headers("cloud1@example.org", "workers", "cloud"))
    assert (waiting(client, 1) or {})["reason"] == "no_worker"
    assert [worker["environment"] for worker in workers(client)] == ["cloud"]


@pytest.mark.parametrize(
    ("hardware", "offer", "reason", "message"),
    [
        (
            HardwareSpec(gpus=1),
            {"memory": 8000},
            "no_gpu",
            "It needs 1 GPU and no connected worker of its environment offers one (at most 0).",
        ),
        (
            HardwareSpec(gpus=2, gpu_mem=1000),
            {"memory": 8000, "gpu_mem": 16000, "gpus": 1},
            "no_gpu",
            "It needs 2 GPUs and no connected worker of its environment offers that many "
            "(at most 1).",
        ),
        (
            HardwareSpec(gpu_model="H100"),
            {"memory": 8000, "gpu_mem": 16000, "gpu_model": "A100"},
            "gpu_model",
            "It needs a GPU of model H100 and the connected GPU workers have A100.",
        ),
        (
            HardwareSpec(gpu_archi="hopper"),
            {"memory": 8000, "gpu_mem": 16000, "gpu_archi": "ampere"},
            "gpu_archi",
            "It needs a GPU of architecture hopper and the connected GPU workers have ampere.",
        ),
        (
            HardwareSpec(gpu_mem=40960),
            {"memory": 8000, "gpu_mem": 16384},
            "gpu_memory",
            "It needs 40 GiB of GPU memory and the connected GPU workers offer at most 16 GiB.",
        ),
        (
            HardwareSpec(memory=65536),
            {"memory": 8192},
            "no_memory",
            "It needs 64 GiB of memory and the connected workers offer at most 8 GiB.",
        ),
        (
            HardwareSpec(cpu_cores=16),
            {"memory": 8000, "cpu_cores": 4},
            "no_cpu",
            "It needs 16 CPU cores and the connected workers offer at most 4.",
        ),
    ],
)
def test_no_connected_worker_has_enough(
    client: TestClient,
    fake_user_api: FakeUserApi,
    hardware: HardwareSpec,
    offer: dict[str, Any],
    reason: str,
    message: str,
) -> None:
    enqueue(client, 1, hardware=hardware)
    assert pull(client, fake_user_api.headers(), **offer) == {}
    assert waiting(client, 1) == {
        "reason": reason,
        "message": message,
        "position": None,
        "attempt": None,
        "max_attempts": None,
    }


def test_busy_workers_give_the_place_in_line(
    client: TestClient, fake_user_api: FakeUserApi
) -> None:
    worker = fake_user_api.headers()
    # Ahead in line but not for these workers: another environment, a GPU.
    enqueue(client, 10, environment=Environment.CLOUD)
    enqueue(client, 11, hardware=HardwareSpec(gpus=1))
    for job_id in (1, 2, 3):
        enqueue(client, job_id, hardware=HardwareSpec(memory=4000))
    enqueue(client, 4, hardware=HardwareSpec(memory=4000), priority=3)
    # The worker takes the job of priority 3 and is then full (it offers less).
    assert len(pull(client, worker, memory=8000)) == 1
    assert pull(client, worker, memory=1000) == {}
    positions = {job_id: waiting(client, job_id) for job_id in (1, 2, 3, 4)}
    assert positions[4] is None  # pulled: it no longer waits
    assert [(answer or {}).get("position") for answer in positions.values()][:3] == [1, 2, 3]
    assert positions[1] == {
        "reason": "busy",
        "message": "The workers that can run it are busy; it is next in line.",
        "position": 1,
        "attempt": None,
        "max_attempts": None,
    }
    assert (positions[3] or {})["message"] == (
        "The workers that can run it are busy; it is number 3 in line."
    )
    # The GPU job is blocked by the lack of a GPU, not by the line.
    assert (waiting(client, 11) or {})["reason"] == "no_gpu"


def test_a_job_for_any_environment_waits_for_older_than(
    client: TestClient, fake_user_api: FakeUserApi
) -> None:
    enqueue(client, 1, environment=None, hardware=HardwareSpec(memory=4000))
    cloud = fake_user_api.headers("cloud1@example.org", "workers", "cloud")
    assert pull(client, cloud, memory=8000, older_than=3600, limit=1) == {}
    answer = waiting(client, 1) or {}
    assert answer["reason"] == "older_than"
    assert answer["message"].startswith(
        "It is for any environment, and the workers that could run it take such jobs "
        "once they are 60 min old (it is "
    )
    # A worker that takes such jobs at once: once it has room, it takes the job.
    assert pull(client, fake_user_api.headers(), memory=8000, older_than=0, limit=1) != {}
    assert waiting(client, 1) is None


def test_a_job_for_any_environment_behind_a_busy_worker(
    client: TestClient, fake_user_api: FakeUserApi
) -> None:
    worker = fake_user_api.headers()
    enqueue(client, 1, hardware=HardwareSpec(memory=4000))
    enqueue(client, 2, environment=None, hardware=HardwareSpec(memory=4000))
    assert pull(client, worker, memory=8000, limit=1, older_than=0) != {}
    assert pull(client, worker, memory=1000, older_than=0) == {}
    enqueue(client, 3, hardware=HardwareSpec(memory=4000))
    assert (waiting(client, 2) or {})["position"] == 1
    assert (waiting(client, 3) or {})["position"] == 2


def test_a_requeued_job_says_which_attempt_it_waits_for(
    make_client: ClientFactory, fake_user_api: FakeUserApi
) -> None:
    client = make_client(timeout_failure=0.3, max_retries=2)
    worker = fake_user_api.headers()
    enqueue(client, 1, hardware=HardwareSpec(memory=4000))
    assert len(pull(client, worker, memory=8000)) == 1
    wait_for(lambda: (1, "queued") in fake_user_api.acknowledged())
    assert waiting(client, 1) == {
        "reason": "requeued",
        "message": (
            "Re-queued after its worker was lost; next in line for the workers that can "
            "run it (attempt 2 of 3, re-queued after its worker was lost)."
        ),
        "position": 1,
        "attempt": 2,
        "max_attempts": 3,
    }
    # Leased again: it no longer waits.
    assert len(pull(client, worker, memory=8000)) == 1
    assert waiting(client, 1) is None


def test_a_requeued_job_blocked_by_hardware_keeps_its_attempt(
    make_client: ClientFactory, fake_user_api: FakeUserApi
) -> None:
    client = make_client(timeout_failure=0.3, max_retries=2)
    gpu_worker = fake_user_api.headers("gpu1@example.org")
    enqueue(client, 1, hardware=HardwareSpec(gpus=1))
    assert len(pull(client, gpu_worker, memory=8000, gpu_mem=8000)) == 1
    wait_for(lambda: (1, "queued") in fake_user_api.acknowledged())
    # The GPU worker is gone; only a CPU worker remains connected.
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        session.execute(delete(ConnectedWorker).where(ConnectedWorker.name == "gpu1@example.org"))
        session.commit()
    pull(client, fake_user_api.headers(), memory=8000)
    answer = waiting(client, 1) or {}
    assert (answer["reason"], answer["attempt"], answer["max_attempts"]) == ("no_gpu", 2, 3)
    assert answer["message"].endswith("(attempt 2 of 3, re-queued after its worker was lost).")


def test_retry_different_names_the_workers_that_lost_it(
    make_client: ClientFactory, fake_user_api: FakeUserApi
) -> None:
    client = make_client(timeout_failure=0.3, max_retries=2, retry_different=True)
    worker = fake_user_api.headers()
    enqueue(client, 1, hardware=HardwareSpec(memory=4000))
    assert len(pull(client, worker)) == 1
    wait_for(lambda: (1, "queued") in fake_user_api.acknowledged())
    answer = waiting(client, 1) or {}
    assert answer["reason"] == "no_worker"
    assert "already lost it once" in answer["message"]
    # Another worker, busy with a job of higher priority: job 1 waits for it.
    other = fake_user_api.headers("worker2@example.org")
    enqueue(client, 2, hardware=HardwareSpec(memory=4000), priority=5)
    assert list(pull(client, other, memory=8000, limit=1)) != []
    assert pull(client, other, memory=1000) == {}
    answer = waiting(client, 1) or {}
    assert (answer["reason"], answer["position"], answer["attempt"]) == ("requeued", 1, 2)


def test_a_worker_not_seen_within_the_window_is_not_connected(
    make_client: ClientFactory, fake_user_api: FakeUserApi
) -> None:
    client = make_client(worker_seen_window_seconds=2, worker_record_every_seconds=0)
    enqueue(client, 1, hardware=HardwareSpec(memory=64000))
    pulled_at = time.monotonic()
    pull(client, fake_user_api.headers(), memory=8000)
    assert (waiting(client, 1) or {})["reason"] == "no_memory"
    assert time.monotonic() - pulled_at < 2, "too slow to see the worker connected"
    time.sleep(max(0.0, pulled_at + 2.2 - time.monotonic()))
    assert (waiting(client, 1) or {})["reason"] == "no_worker"
    assert workers(client) == []


def test_keep_alives_keep_a_busy_worker_connected(
    make_client: ClientFactory, fake_user_api: FakeUserApi
) -> None:
    client = make_client(worker_seen_window_seconds=1.5, worker_record_every_seconds=0)
    worker = fake_user_api.headers()
    enqueue(client, 1)
    [queue_id] = pull(client, worker, memory=8000, limit=1)
    first = workers(client)[0]["last_seen_at"]
    # Busy with its job, the worker no longer pulls: its keep-alives are enough.
    until = time.monotonic() + 2.5
    while time.monotonic() < until:
        response = client.put(
            f"/jobs/{queue_id}/status", params={"status": "pulled"}, headers=worker
        )
        assert response.status_code == 204, response.text
        time.sleep(0.3)
    [listed] = workers(client)
    assert listed["last_seen_at"] > first
    assert listed["last_pull_at"] == first
    assert listed["jobs"] == [{"job_id": 1, "status": "pulled"}]


def test_a_busy_worker_is_judged_by_its_largest_offer(
    client: TestClient, fake_user_api: FakeUserApi
) -> None:
    worker = fake_user_api.headers()
    pull(client, worker, memory=8000, cpu_cores=8)
    pull(client, worker, memory=1000, cpu_cores=1)  # busy now: offers less
    enqueue(client, 1, hardware=HardwareSpec(memory=4000, cpu_cores=4))
    assert (waiting(client, 1) or {})["reason"] == "busy"
    [listed] = workers(client)
    assert listed["offered"]["memory"] == 1000 and listed["peak"]["memory"] == 8000


def test_workers_list_their_offer_and_jobs(client: TestClient, fake_user_api: FakeUserApi) -> None:
    gpu = fake_user_api.headers("gpu1@example.org")
    enqueue(client, 1, hardware=HardwareSpec(gpus=1))
    enqueue(client, 2)
    [queue_id] = pull(
        client, gpu, memory=32000, cpu_cores=8, gpu_mem=16000, gpu_model="A100", limit=1
    )
    status = client.put(f"/jobs/{queue_id}/status", params={"status": "running"}, headers=gpu)
    assert status.status_code == 204, status.text
    [listed] = workers(client)
    assert listed["name"] == "gpu1@example.org"
    assert listed["environment"] == "local"
    assert listed["groups"] == ["workers"]
    assert listed["offered"] == {
        "memory": 32000,
        "cpu_cores": 8,
        "gpus": 1,
        "gpu_mem": 16000,
        "gpu_model": "A100",
        "gpu_archi": None,
    }
    assert listed["jobs"] == [{"job_id": 1, "status": "running"}]


def test_pulls_are_recorded_at_most_every_few_seconds_unless_the_offer_changes(
    make_client: ClientFactory, fake_user_api: FakeUserApi
) -> None:
    client = make_client(worker_record_every_seconds=60)
    worker = fake_user_api.headers()
    pull(client, worker, memory=8000)
    [first] = workers(client)
    pull(client, worker, memory=8000)
    assert workers(client)[0]["last_pull_at"] == first["last_pull_at"]
    pull(client, worker, memory=4000)
    [changed] = workers(client)
    assert changed["last_pull_at"] > first["last_pull_at"]
    assert changed["offered"]["memory"] == 4000


def test_record_pull_upserts_on_both_databases(engine: Engine) -> None:
    factory = make_session_factory(engine)
    with factory.begin() as session:
        session.execute(delete(ConnectedWorker))
    now = utcnow()
    offer = WorkerOffer(name="w1", environment=Environment.LOCAL, memory=8000, gpus=1, gpu_mem=10)
    for memory, gpu_model, at in ((8000, "A100", now), (2000, None, now + timedelta(seconds=1))):
        with factory.begin() as session:
            presence.record_pull(
                session,
                WorkerOffer(
                    name=offer.name,
                    environment=offer.environment,
                    memory=memory,
                    gpu_model=gpu_model,
                ),
                groups=["workers"],
                older_than=0.0,
                now=at,
                window_seconds=90,
            )
    with factory.begin() as session:
        presence.touch(session, "w1", now=now + timedelta(seconds=2))
        [row] = presence.connected(session, since=now)
        assert (row.memory, row.peak_memory, row.gpu_model) == (2000, 8000, "A100")
        assert row.last_seen_at == now + timedelta(seconds=2)
        assert row.connected_at == now
    # Back after the window: the peak starts again from the new offer.
    with factory.begin() as session:
        presence.record_pull(
            session,
            WorkerOffer(name="w1", environment=Environment.LOCAL, memory=1000),
            groups=[],
            older_than=0.0,
            now=now + timedelta(seconds=500),
            window_seconds=90,
        )
        [row] = presence.connected(session, since=now)
        assert (row.peak_memory, row.gpu_model, row.connected_at) == (
            1000,
            None,
            now + timedelta(seconds=500),
        )
