"""The runner's result uploads against the real worker API (served by uvicorn on
loopback) and real local storage: odd result names, the owner's storage
limit. The container is the runner's in-package fake backend, which writes the
files a tool would."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from labcloud.storage.paths import PARTIAL_PREFIX
from tests.e2e.stack import free_port
from tests.waiting import wait_for
from tests.worker_api.conftest import FakeUserApi, queue_job
from worker_api.app import create_app
from worker_api.settings import WorkerApiSettings
from worker_runner.backends.fake import FakeBackend, FakeProgram, FakeSettings
from worker_runner.client import WorkerApiClient
from worker_runner.dispatcher import Runner
from worker_runner.settings import WorkerSettings

KEY = "internal-key-for-tests-0123456789"


@pytest.fixture
def worker_api(tmp_path: Path, fake_user_api: FakeUserApi) -> Iterator[str]:
    """The worker API's URL, served on loopback until the test ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = WorkerApiSettings(
        _env_file=None,
        internal_api_key_secret=KEY,
        userfacing_api_url=fake_user_api.url,
        queue_db_url=f"sqlite:///{tmp_path / 'queue.db'}",
        user_data_root_path=tmp_path / "data",
        public_url=url,
        status_forward_poll_seconds=0.05,
        status_forward_retry_max_seconds=0.05,
        account_check_ttl_seconds=0,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30, what="the worker API to start")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _run(
    worker_api: str, fake_user_api: FakeUserApi, tmp_path: Path, program: FakeProgram
) -> dict[str, Any]:
    """Enqueue job 1 of user u1, let a runner run ``program`` for it, and return the
    final status update the user API received."""
    job = queue_job(1).model_dump(mode="json")
    job["job"]["handler"]["files_up"] = {"output": "out", "log": "logs"}
    enqueued = httpx.post(f"{worker_api}/_jobs", json=job, headers={"x-api-key": KEY})
    assert enqueued.status_code == 201, enqueued.text
    settings = WorkerSettings(
        _env_file=None,
        api_url=worker_api,
        auth_url=fake_user_api.url,
        username="worker1@example.org",
        password="unused",
        timeout_job=0.05,
        timeout_status=0.5,
        wait=0,
        shutdown_grace=1,
    )
    client = WorkerApiClient(
        api_url=worker_api,
        auth_url=fake_user_api.url,
        username="worker1@example.org",
        password="unused",
        retry_delays=(0.05,),
    )
    host = FakeSettings(
        path_base=tmp_path / "jobs", fake_cpu_cores=2, fake_memory=4096, _env_file=None
    )
    runner = Runner(settings, client, FakeBackend(host, default=program))
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:

        def final() -> dict[str, Any] | None:
            with fake_user_api.lock:
                for _code, body, _key in fake_user_api.received:
                    if body["status"] in ("finished", "error"):
                        return body
            return None

        body: dict[str, Any] = wait_for(final, timeout=60, what="the job's final status")
        return body
    finally:
        stop.set()
        runner.hurry()
        thread.join(timeout=30)
        client.close()
        assert not thread.is_alive()


def _stored(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_odd_result_names_are_skipped_and_the_job_finishes(
    worker_api: str, fake_user_api: FakeUserApi, tmp_path: Path
) -> None:
    deep = "/".join(["d" * 200] * 6)
    odd = {
        "out/back\\slash.txt": b"x",
        "out/new\nline.txt": b"x",
        "out/bad-\udcff.txt": b"x",  # invalid UTF-8 (the byte 0xff)
        f"out/{PARTIAL_PREFIX}x": b"x",
        f"out/{deep}/too-long.txt": b"x",
    }
    program = FakeProgram(
        log_lines=("tool ran",),
        files={"out/a.txt": b"A", "out/sub/b.txt": b"B", "out/z.txt": b"Z", **odd},
    )
    final = _run(worker_api, fake_user_api, tmp_path, program)
    assert final["status"] == "finished", final
    outputs = tmp_path / "data/u1/output/job1"
    assert _stored(outputs) == {"a.txt": b"A", "sub/b.txt": b"B", "z.txt": b"Z"}
    log = (tmp_path / "data/u1/log/job1/log.txt").read_text()
    assert "tool ran" in log
    assert log.count("skipped result") == len(odd)
    for reason in ("backslash", "control character", "UTF-8", "reserved", "too long"):
        assert reason in log, reason


def test_results_over_the_owners_limit_fail_the_job_and_keep_what_fit_and_the_log(
    worker_api: str, fake_user_api: FakeUserApi, tmp_path: Path
) -> None:
    fake_user_api.accounts["u1"] = {"active": True, "max_storage_bytes": 1000}
    program = FakeProgram(
        log_lines=("wrote results",),
        files={"out/a.bin": b"a" * 600, "out/b.bin": b"b" * 600, "out/c.bin": b"c" * 10},
    )
    final = _run(worker_api, fake_user_api, tmp_path, program)
    assert final["status"] == "error", final
    assert "storage limit reached" in final["runtime_details"]
    assert _stored(tmp_path / "data/u1/output/job1") == {"a.bin": b"a" * 600}
    log = (tmp_path / "data/u1/log/job1/log.txt").read_text()
    assert "wrote results" in log
    assert "'output/b.bin'" in log and "'output/c.bin'" in log
