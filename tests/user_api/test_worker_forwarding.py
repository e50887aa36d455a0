"""Delivery of the worker outbox: the user API app with its background forwarder,
and a stand-in worker API on loopback that records what it receives and answers
what a test tells it to."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from labcloud.auth.local import generate_private_key_pem
from labcloud.contract import INTERNAL_API_KEY_HEADER
from tests.user_api.conftest import TEST_CATALOG
from tests.user_api.helpers import signup
from tests.waiting import wait_for
from user_api.app import create_app
from user_api.models import Job, WorkerOutbox
from user_api.settings import UserApiSettings


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Any
    key: str | None
    code: int

    @property
    def job_ids(self) -> list[int]:
        """The jobs an enqueue carries, or the job a cancellation names."""
        if self.method == "DELETE":
            return [int(self.path.split("?")[0].rsplit("/", 1)[1])]
        jobs = self.body if isinstance(self.body, list) else [self.body]
        return [job["job"]["meta"]["job_id"] for job in jobs]


class FakeWorkerApi:
    """Records requests; answers ``replies`` (by path prefix) first, then success.
    While ``hold`` is clear, requests wait for it (a request "on its way")."""

    def __init__(self) -> None:
        self.received: list[Request] = []
        self.replies: dict[str, deque[int]] = {}
        self.arrived = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length)) if length else None
                path = self.path.split("?")[0]
                with fake._lock:
                    queued = fake.replies.get(path)
                    code = queued.popleft() if queued else 201
                    if code == 201 and self.command == "DELETE":
                        code = 204
                    elif code == 201 and path == "/_jobs/batch":
                        code = 200
                    key = self.headers[INTERNAL_API_KEY_HEADER]
                    fake.received.append(Request(self.command, self.path, body, key, code))
                fake.arrived.set()
                fake.hold.wait(10)
                payload = b"[]" if code == 200 else b"{}"
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload) if code != 204 else 0))
                self.end_headers()
                if code != 204:
                    self.wfile.write(payload)

            def do_POST(self) -> None:
                self._handle()

            def do_DELETE(self) -> None:
                self._handle()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))

    def answer(self, path: str, *codes: int) -> None:
        """Answer the next requests to exactly ``path`` with ``codes``."""
        with self._lock:
            self.replies.setdefault(path, deque()).extend(codes)

    def requests(self, method: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.received if method is None or r.method == method]

    def enqueued(self) -> list[int]:
        """Job ids of every enqueue the worker API accepted, in arrival order."""
        return [job for r in self.requests("POST") if r.code in (200, 201) for job in r.job_ids]

    def __enter__(self) -> FakeWorkerApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hold.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def worker_api() -> Iterator[FakeWorkerApi]:
    with FakeWorkerApi() as fake:
        yield fake


@pytest.fixture
def settings(tmp_path: Path, database_url: str, worker_api: FakeWorkerApi) -> UserApiSettings:
    return UserApiSettings(
        _env_file=None,
        internal_api_key_secret="internal-key-for-tests-0123456789",
        local_auth_private_key=generate_private_key_pem(),
        database_url=database_url,
        user_data_root_path=tmp_path / "data",
        application_config_file=TEST_CATALOG,
        workerfacing_api_url=worker_api.url,
        allow_self_signup=True,
        forward_poll_seconds=0.05,
        forward_retry_max_seconds=0.05,
    )


@pytest.fixture
def client(settings: UserApiSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def user(client: TestClient) -> dict[str, str]:
    headers = signup(client, "ada@example.org")
    response = client.post(
        "/files/data/upload", files={"file": ("a.txt", b"one two")}, headers=headers
    )
    assert response.status_code == 201, response.text
    return headers


def submit(client: TestClient, headers: dict[str, str], name: str) -> int:
    body = {
        "job_name": name,
        "application": {"application": "demo", "version": "latest", "entrypoint": "wordcount"},
        "attributes": {"files_down": {"data_ids": ["a.txt"]}},
    }
    response = client.post("/jobs", json=body, headers=headers)
    assert response.status_code == 201, response.text
    job_id: int = response.json()["id"]
    return job_id


def outbox(client: TestClient) -> list[WorkerOutbox]:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(WorkerOutbox).order_by(WorkerOutbox.id)))


def job_status(client: TestClient, job_id: int) -> str | None:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        status: str | None = session.scalar(select(Job.status).where(Job.id == job_id))
        return status


def test_a_backlog_is_handed_over_in_one_batch_in_order(
    client: TestClient, user: dict[str, str], worker_api: FakeWorkerApi
) -> None:
    worker_api.hold.clear()  # keep the first send on its way while the rest pile up
    first = submit(client, user, "job-0")
    worker_api.arrived.wait(5)
    worker_api.answer("/_jobs/batch", 503)  # and the backlog first finds it failing
    others = [submit(client, user, f"job-{n}") for n in range(1, 8)]
    worker_api.hold.set()
    wait_for(lambda: not outbox(client))
    assert worker_api.enqueued() == [first, *others]
    batches = [r for r in worker_api.requests("POST") if r.path == "/_jobs/batch"]
    assert [(r.code, r.job_ids) for r in batches] == [(503, others), (200, others)]
    assert {r.key for r in worker_api.requests()} == {"internal-key-for-tests-0123456789"}
    assert all(job_status(client, job) == "queued" for job in [first, *others])


def test_without_a_batch_route_jobs_go_one_by_one(
    client: TestClient, user: dict[str, str], worker_api: FakeWorkerApi
) -> None:
    worker_api.hold.clear()  # keep the first send on its way while the rest pile up
    first = submit(client, user, "job-0")
    worker_api.arrived.wait(5)
    worker_api.answer("/_jobs/batch", 404)
    others = [submit(client, user, f"job-{n}") for n in range(1, 5)]
    worker_api.hold.set()
    wait_for(lambda: not outbox(client))
    assert worker_api.enqueued() == [first, *others]
    paths = [r.path for r in worker_api.requests("POST")]
    assert paths.count("/_jobs/batch") == 1  # asked once, then never again
    more = submit(client, user, "job-5")
    other = submit(client, user, "job-6")
    wait_for(lambda: not outbox(client))
    assert worker_api.enqueued()[-2:] == [more, other]
    assert [r.path for r in worker_api.requests("POST")].count("/_jobs/batch") == 1


def test_a_job_the_worker_api_refuses_ends_in_error_and_the_rest_go_through(
    client: TestClient, user: dict[str, str], worker_api: FakeWorkerApi
) -> None:
    worker_api.hold.clear()
    first = submit(client, user, "job-0")
    worker_api.arrived.wait(5)
    worker_api.answer("/_jobs/batch", 422)
    worker_api.answer("/_jobs", 422)  # the first of the single sends: job-1
    refused = submit(client, user, "job-1")
    accepted = submit(client, user, "job-2")
    worker_api.hold.set()
    wait_for(lambda: not outbox(client))
    assert job_status(client, refused) == "error"
    assert job_status(client, first) == job_status(client, accepted) == "queued"
    assert worker_api.enqueued()[-1] == accepted
    details = client.get(f"/jobs/{refused}", headers=user).json()["runtime_details"]
    assert details.startswith("could not be queued: worker API refused the job (422)")


@pytest.mark.parametrize(("action", "discard"), [("cancel", "false"), ("delete", "true")])
def test_a_job_cancelled_while_its_enqueue_is_on_its_way_is_cancelled_there_too(
    client: TestClient,
    user: dict[str, str],
    worker_api: FakeWorkerApi,
    action: str,
    discard: str,
) -> None:
    worker_api.hold.clear()
    job_id = submit(client, user, "job-0")
    worker_api.arrived.wait(5)  # the worker API is receiving it right now
    if action == "cancel":
        assert client.post(f"/jobs/{job_id}/cancel", headers=user).status_code == 200
    else:
        assert client.delete(f"/jobs/{job_id}", headers=user).status_code == 204
    worker_api.hold.set()
    [cancel] = wait_for(lambda: worker_api.requests("DELETE"))
    assert cancel.path == f"/_jobs/{job_id}?discard_outputs={discard}"
    wait_for(lambda: not outbox(client))
    assert worker_api.enqueued() == [job_id]


def test_a_job_cancelled_before_its_enqueue_left_is_never_sent(
    client: TestClient, user: dict[str, str], worker_api: FakeWorkerApi
) -> None:
    worker_api.hold.clear()
    first = submit(client, user, "job-0")
    worker_api.arrived.wait(5)
    withdrawn = submit(client, user, "job-1")
    assert client.post(f"/jobs/{withdrawn}/cancel", headers=user).status_code == 200
    worker_api.hold.set()
    wait_for(lambda: not outbox(client))
    assert worker_api.enqueued() == [first]
    assert worker_api.requests("DELETE") == []


def test_a_job_is_handed_over_at_once_after_its_commit(
    settings: UserApiSettings, worker_api: FakeWorkerApi
) -> None:
    # Polling only every minute: the commit of the submission wakes the relay.
    slow_poll = settings.model_copy(update={"forward_poll_seconds": 60.0})
    with TestClient(create_app(slow_poll)) as client:
        headers = signup(client, "ada@example.org")
        upload = client.post("/files/data/upload", files={"file": ("a.txt", b"x")}, headers=headers)
        assert upload.status_code == 201, upload.text
        time.sleep(0.2)  # the relay found the outbox empty and rests
        started = time.monotonic()
        job_id = submit(client, headers, "job-0")
        wait_for(lambda: worker_api.enqueued() == [job_id], timeout=30)
        assert time.monotonic() - started < 10  # far under the poll interval
        assert client.post(f"/jobs/{job_id}/cancel", headers=headers).status_code == 200
        [cancel] = wait_for(lambda: worker_api.requests("DELETE"), timeout=30)
        assert cancel.path == f"/_jobs/{job_id}?discard_outputs=false"


@pytest.mark.postgres
def test_two_api_processes_hand_jobs_over_in_order(
    settings: UserApiSettings, worker_api: FakeWorkerApi, postgres_database: str
) -> None:
    # Both relays share one PostgreSQL database; whichever holds the outbox's lock
    # delivers, so jobs arrive in the order they were submitted.
    shared = settings.model_copy(update={"database_url": postgres_database})
    with TestClient(create_app(shared)) as first, TestClient(create_app(shared)) as second:
        headers = signup(first, "ada@example.org")
        upload = first.post("/files/data/upload", files={"file": ("a.txt", b"x")}, headers=headers)
        assert upload.status_code == 201, upload.text
        jobs = [submit(first if n % 2 else second, headers, f"job-{n}") for n in range(12)]
        wait_for(lambda: not outbox(first))
    assert worker_api.enqueued() == jobs
