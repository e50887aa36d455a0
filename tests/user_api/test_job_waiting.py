"""Why a queued job waits, seen through the user API (GET /jobs/{id}), and the
connected workers for admins (GET /admin/workers, ``labcloud admin workers``),
with the user API and the worker API running as processes on loopback and a
worker pulling over HTTP as a runner does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from labcloud_cli.main import main
from tests.e2e.stack import ADMIN, PASSWORD, Stack
from tests.waiting import wait_for

CATALOG = Path(__file__).resolve().parents[1] / "data" / "application_config.yaml"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("waiting"), CATALOG)
    try:
        stack.start(runners=0)
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


def _job(name: str, **hardware: Any) -> dict[str, Any]:
    return {
        "job_name": name,
        "application": {"application": "testing", "version": "1.0", "entrypoint": "noop"},
        "hardware": hardware or None,
    }


def _waiting(client: httpx.Client, job_id: int) -> dict[str, Any] | None:
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "queued"
    waiting: dict[str, Any] | None = response.json()["waiting"]
    return waiting


def _worker(stack: Stack, email: str) -> httpx.Client:
    stack.add_worker_account(email)
    return httpx.Client(base_url=stack.worker_url, headers=stack.token(email), timeout=30)


def test_a_queued_job_says_why_it_waits(stack: Stack) -> None:
    user = stack.user("waiting-ada@example.org")
    gpu_job = user.post("/jobs", json=_job("gpu", gpus=1)).json()["id"]
    # Until the worker API has the job (the outbox delivers it), it says nothing.
    first = wait_for(lambda: _waiting(user, gpu_job), what="a waiting reason")
    assert first == {
        "reason": "no_worker",
        "message": "No worker is connected.",
        "position": None,
        "attempt": None,
        "max_attempts": None,
    }
    worker = _worker(stack, "waiting-cpu@example.org")
    assert worker.get("/jobs", params={"memory": 1024, "cpu_cores": 2}).json() == {}
    assert (_waiting(user, gpu_job) or {})["reason"] == "no_gpu"

    big_job = user.post("/jobs", json=_job("big", memory=65536)).json()["id"]
    big = wait_for(lambda: _waiting(user, big_job))
    assert big["reason"] == "no_memory"
    assert big["message"] == (
        "It needs 64 GiB of memory and the connected workers offer at most 1 GiB."
    )
    # The list does not ask the worker API, job by job.
    listed = user.get("/jobs", params={"status": "queued"}).json()
    assert {job["id"] for job in listed} >= {gpu_job, big_job}
    assert all(job["waiting"] is None for job in listed)
    # A job that runs says nothing of waiting.
    small_job = user.post("/jobs", json=_job("small", memory=512)).json()["id"]
    wait_for(lambda: _waiting(user, small_job))
    pulled = worker.get("/jobs", params={"memory": 1024}).json()
    assert len(pulled) == 1
    wait_for(lambda: user.get(f"/jobs/{small_job}").json()["status"] == "pulled")
    assert user.get(f"/jobs/{small_job}").json()["waiting"] is None
    worker.put(f"/jobs/{next(iter(pulled))}/status", params={"status": "finished"})


def test_admins_see_the_connected_workers(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    user = stack.user("workers-bob@example.org")
    job = user.post("/jobs", json=_job("held", memory=512)).json()["id"]
    wait_for(lambda: _waiting(user, job))
    worker = _worker(stack, "workers-gpu@example.org")
    offer: dict[str, Any] = {"memory": 8192, "cpu_cores": 4, "gpu_mem": 16384, "gpu_model": "A100"}
    # The GPU job of the test above, still queued, may come along.
    leased = wait_for(lambda: worker.get("/jobs", params={**offer, "limit": 10}).json())
    [queue_id] = [key for key, spec in leased.items() if spec["meta"]["job_id"] == job]
    running = worker.put(f"/jobs/{queue_id}/status", params={"status": "running"})
    assert running.status_code == 204, running.text

    admin = httpx.Client(base_url=stack.user_url, headers=stack.token(ADMIN), timeout=30)
    response = admin.get("/admin/workers")
    assert response.status_code == 200, response.text
    [listed] = [w for w in response.json() if w["name"] == "workers-gpu@example.org"]
    assert listed["environment"] == "local"
    assert listed["groups"] == ["workers"]
    assert listed["offered"] == {
        "memory": 8192,
        "cpu_cores": 4,
        "gpus": 1,
        "gpu_mem": 16384,
        "gpu_model": "A100",
        "gpu_archi": None,
    }
    assert {"id": job, "status": "running"} in listed["jobs"]
    assert user.get("/admin/workers").status_code == 403

    monkeypatch.setenv("LABCLOUD_ADMIN_PASSWORD", PASSWORD)
    capsys.readouterr()
    assert main(["admin", "--url", stack.user_url, "--email", ADMIN, "workers"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "WORKER",
        "ENV",
        "LAST",
        "SEEN",
        "MEMORY",
        "FREE/MOST",
        "CORES",
        "GPUS",
        "JOBS",
    ]
    [row] = [line for line in table if line.startswith("workers-gpu@example.org")]
    assert "8.0 GiB / 8.0 GiB" in row
    assert "4 / 4" in row
    assert "1 A100 16.0 GiB / 1" in row
    assert f"{job} (running)" in row
    assert main(["admin", "--url", stack.user_url, "--email", ADMIN, "--json", "workers"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    [jobs] = [w["jobs"] for w in as_json if w["name"] == "workers-gpu@example.org"]
    assert {"id": job, "status": "running"} in jobs
    for held in leased:
        worker.put(f"/jobs/{held}/status", params={"status": "finished"})
