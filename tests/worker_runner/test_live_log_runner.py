"""A runner ships a job's live log whatever its backend (here the in-package fake
one, whose ``stream_logs`` plays its program's lines), before the job's final
status, with the tool's progress."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.worker_runner.conftest import FakeWorkerApi, job_spec, run_one
from worker_runner.backends.fake import FakeBackend, FakeProgram, FakeSettings
from worker_runner.client import WorkerApiClient
from worker_runner.settings import WorkerSettings


class ShippingApi(FakeWorkerApi):
    """The stand-in worker API, which also takes live log chunks and notes what
    had arrived when each status came."""

    def __init__(self) -> None:
        super().__init__()
        self.log: dict[str, bytearray] = {}
        self.progress: dict[str, tuple[str | None, str | None]] = {}
        self.log_at_status: list[tuple[str, bytes]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        if request.method == "POST" and parts[0] == "jobs" and parts[2:] == ["log"]:
            params = request.url.params
            with self.lock:
                stored = self.log.setdefault(parts[1], bytearray())
                offset = int(params["offset"])
                stored += request.content[len(stored) - offset :]
                if "progress" in params:
                    self.progress[parts[1]] = (
                        params.get("progress"),
                        params.get("progress_message"),
                    )
            answer = {"next_offset": offset + len(request.content), "truncated": False}
            return httpx.Response(200, content=json.dumps(answer))
        if request.method == "PUT" and parts[2:] == ["status"]:
            with self.lock:
                self.log_at_status.append(
                    (request.url.params["status"], bytes(self.log.get(parts[1], b"")))
                )
        return super().handle(request)


@pytest.fixture
def api() -> ShippingApi:
    return ShippingApi()


def test_the_log_and_progress_are_shipped_before_the_final_status(
    api: ShippingApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    lines = ("starting", "LABCLOUD_PROGRESS 0.5 half way", "more", "LABCLOUD_PROGRESS 1 done")
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=0.3, log_lines=lines))

    final = run_one(api, settings, client, backend, job_spec())

    assert final == ("finished", None)
    expected = "".join(f"{line}\n" for line in lines).encode()
    assert bytes(api.log["q1"]) == expected
    assert api.progress["q1"] == ("1.0", "done")
    # Everything shipped was in when the job was reported finished.
    assert ("finished", expected) in api.log_at_status
