"""Live logs and progress through real processes and the real Docker engine: the
runner ships a container's output as it comes, the worker API keeps it bounded, the
user API serves it (GET /jobs/{id}/logs, ?follow=true) and the job's progress."""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from labcloud_cli.images import ensure_demo_image
from tests.e2e.stack import ADMIN, Stack
from tests.waiting import wait_for
from worker_api.logs.service import TRUNCATION_MARKER

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
CATALOG = Path(__file__).resolve().parent / "live_logs_catalog.yaml"
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ensure_demo_image(docker.from_env())
    stack = Stack(tmp_path_factory.mktemp("live-logs"), CATALOG)
    stack.worker_api.env["LIVE_LOG_MAX_BYTES"] = str(MAX_BYTES)
    try:
        stack.start(runners=1)
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


def _submit(client: httpx.Client, entrypoint: str, **env: str) -> int:
    response = client.post(
        "/jobs",
        json={
            "job_name": f"{entrypoint}-{secrets.token_hex(3)}",
            "application": {"application": "logs", "version": "1.0", "entrypoint": entrypoint},
            "attributes": {"env_vars": env},
        },
    )
    assert response.status_code == 201, response.text
    job_id: int = response.json()["id"]
    return job_id


def _status(client: httpx.Client, job_id: int) -> str:
    status: str = client.get(f"/jobs/{job_id}").json()["status"]
    return status


def _ended(client: httpx.Client, job_id: int) -> dict[str, Any]:
    wait_for(
        lambda: _status(client, job_id) in {"finished", "error", "canceled"},
        timeout=120,
        what=f"job {job_id} to end",
    )
    job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
    return job


def _email() -> str:
    return f"logs-{secrets.token_hex(4)}@example.org"


def test_a_following_client_sees_lines_while_the_container_runs(stack: Stack) -> None:
    with stack.user(_email()) as client:
        job_id = _submit(client, "ticker", TICKS="3", TICK_SECONDS="1", LINGER="4")
        received = b""
        seen_running = False
        with client.stream(
            "GET", f"/jobs/{job_id}/logs", params={"follow": "true"}, timeout=60
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/plain")
            for piece in stream.iter_bytes():
                received += piece
                if b"tick-1\n" in received and not seen_running:
                    # The line came while its container still runs.
                    seen_running = True
                    assert _status(client, job_id) == "running"
                    containers = docker.from_env().containers.list(
                        filters={"label": f"labcloud.job_id={job_id}"}
                    )
                    assert containers and containers[0].status == "running"
        # The stream ended by itself when the job ended, with everything in.
        assert seen_running
        text = received.decode()
        assert [line for line in text.splitlines() if line.startswith("tick-")] == [
            "tick-1",
            "tick-2",
            "tick-3",
        ]
        assert text.endswith("ticker-done\n")
        job = _ended(client, job_id)
        assert job["status"] == "finished"
        assert job["progress"]["fraction"] == pytest.approx(1.0)
        assert job["progress"]["message"] == "step 3 of 3"
        assert job["progress"]["updated_at"]


def test_progress_shows_while_the_job_runs(stack: Stack) -> None:
    with stack.user(_email()) as client:
        job_id = _submit(client, "ticker", TICKS="4", TICK_SECONDS="2")

        def halfway() -> dict[str, Any] | None:
            job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
            progress = job.get("progress")
            if progress and progress["fraction"] is not None and progress["fraction"] >= 0.5:
                return job
            return None

        job = wait_for(halfway, timeout=60, interval=0.2, what="progress of 0.5")
        assert job["status"] == "running"
        assert job["progress"]["message"].startswith("step ")
        assert _ended(client, job_id)["progress"]["fraction"] == pytest.approx(1.0)


def test_offsets_resume_and_complete_says_when_all_is_in(stack: Stack) -> None:
    with stack.user(_email()) as client:
        job_id = _submit(client, "ticker", TICKS="2", TICK_SECONDS="0")
        first = client.get(f"/jobs/{job_id}/logs")
        assert first.status_code == 200
        assert first.headers["x-log-complete"] in ("true", "false")
        _ended(client, job_id)
        whole = client.get(f"/jobs/{job_id}/logs")
        assert whole.headers["x-log-complete"] == "true"
        end = int(whole.headers["x-log-next-offset"])
        assert end == len(whole.content) and whole.text.endswith("ticker-done\n")
        tail = client.get(f"/jobs/{job_id}/logs", params={"offset": end - 12})
        assert tail.content == whole.content[-12:]
        assert int(tail.headers["x-log-next-offset"]) == end
        after = client.get(f"/jobs/{job_id}/logs", params={"offset": end})
        assert after.content == b"" and after.headers["x-log-complete"] == "true"
        # A follow from the end of an ended job's log answers at once, empty.
        began = time.monotonic()
        followed = client.get(f"/jobs/{job_id}/logs", params={"follow": "true", "offset": end})
        assert followed.status_code == 200 and followed.content == b""
        assert time.monotonic() - began < 5


def test_a_flood_is_truncated_with_its_marker(stack: Stack) -> None:
    with stack.user(_email()) as client:
        job_id = _submit(client, "flood", FLOOD_BYTES=str(3_000_000))
        assert _ended(client, job_id)["status"] == "finished"
        log = client.get(f"/jobs/{job_id}/logs")
        assert log.headers["x-log-complete"] == "true"
        marker = TRUNCATION_MARKER % MAX_BYTES
        assert log.content.endswith(marker)
        assert len(log.content) <= MAX_BYTES
        assert log.content.startswith(b"0123456789abcdef")
    # Nothing over the bound reached the database.
    queue_db = stack.queue_db.removeprefix("sqlite:///")
    with sqlite3.connect(queue_db) as db:
        (stored,) = db.execute(
            "SELECT SUM(LENGTH(data)) FROM live_log_chunks WHERE job_id = ?", (job_id,)
        ).fetchone()
        (size, truncated) = db.execute(
            "SELECT size, truncated FROM live_logs WHERE job_id = ?", (job_id,)
        ).fetchone()
    assert stored == size <= MAX_BYTES
    assert truncated


def test_another_users_job_log_is_not_found(stack: Stack) -> None:
    with stack.user(_email()) as owner, stack.user(_email()) as other:
        job_id = _submit(owner, "ticker", TICKS="1", TICK_SECONDS="0")
        assert other.get(f"/jobs/{job_id}/logs").status_code == 404
        assert other.get(f"/jobs/{job_id}/logs", params={"follow": "true"}).status_code == 404
        assert owner.get(f"/jobs/{job_id}/logs").status_code == 200
        assert other.get("/jobs/999999999/logs").status_code == 404
        _ended(owner, job_id)


def test_the_worker_api_refuses_chunks_for_jobs_the_worker_does_not_hold(stack: Stack) -> None:
    with stack.user(_email()) as client:
        job_id = _submit(client, "ticker", TICKS="1", TICK_SECONDS="0")
        _ended(client, job_id)
    queue_db = stack.queue_db.removeprefix("sqlite:///")
    with sqlite3.connect(queue_db) as db:
        (queue_id,) = db.execute(
            "SELECT id FROM queued_jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
    worker = stack.token(stack.worker)
    url = f"{stack.worker_url}/jobs/{queue_id}/log"
    # The job has ended: its worker holds it no more.
    ended = httpx.post(url, params={"offset": 0}, content=b"late\n", headers=worker)
    assert ended.status_code == 404, ended.text
    unknown = httpx.post(
        f"{stack.worker_url}/jobs/99999999/log", params={"offset": 0}, content=b"x", headers=worker
    )
    assert unknown.status_code == 404
    # A user's token is no worker's.
    user = stack.token(ADMIN)
    refused = httpx.post(url, params={"offset": 0}, content=b"x", headers=user)
    assert refused.status_code in (401, 403)
    # The internal read needs the internal key.
    assert httpx.get(f"{stack.worker_url}/_jobs/{job_id}/log").status_code in (401, 403)


def test_the_demo_tool_reports_its_progress(stack: Stack) -> None:
    with stack.user(_email()) as client:
        for name in ("a.txt", "b.txt"):
            uploaded = client.post(
                "/files/data/texts/upload", files={"file": (name, b"some words here\n")}
            )
            assert uploaded.status_code == 201, uploaded.text
        response = client.post(
            "/jobs",
            json={
                "job_name": f"count-{secrets.token_hex(3)}",
                "application": {
                    "application": "demo",
                    "version": "latest",
                    "entrypoint": "wordcount",
                },
                "attributes": {"files_down": {"data_ids": ["texts"]}},
            },
        )
        assert response.status_code == 201, response.text
        job = _ended(client, response.json()["id"])
        assert job["status"] == "finished"
        assert job["progress"]["fraction"] == pytest.approx(1.0)
        assert job["progress"]["message"] == "2 file(s) counted"
        log = client.get(f"/jobs/{job['id']}/logs").text
        assert "LABCLOUD_PROGRESS 0.500 a.txt" in log
