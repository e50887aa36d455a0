"""What the runner's tests share: a stateful fake worker API
(``httpx.MockTransport``), job specs, and a runner on the in-package fake backend."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import httpx
import pytest

from labcloud.contract import HardwareSpec
from worker_runner.backends.fake import FakeBackend, FakeSettings
from worker_runner.client import WorkerApiClient
from worker_runner.dispatcher import Runner
from worker_runner.hardware import GpuInfo, gpus_needed
from worker_runner.settings import WorkerSettings

API = "http://worker-api"
AUTH = "http://user-api"
STORAGE = "http://storage"
WORKER = "worker-1"
TOKEN = "token-1"
IMAGE = "lab/tool:1"


@dataclass
class Upload:
    queue_id: str
    kind: str
    base_path: str
    content: bytes
    form: dict[str, str]


class FakeWorkerApi:
    """The worker API and its storage, in memory: leases queued jobs, records
    statuses and uploads, serves inputs through signed URLs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: list[tuple[str, dict[str, Any]]] = []
        self.statuses: list[tuple[str, str, str | None]] = []
        # The JSON bodies of status reports (a StatusReport), by job, in order.
        self.reports: dict[str, list[dict[str, Any]]] = {}
        self.inputs: dict[str, bytes] = {}
        self.broken_inputs: set[str] = set()
        self.gone: set[str] = set()
        self.uploads: list[Upload] = []
        self.pull_params: list[dict[str, str]] = []
        self.leased: list[str] = []
        self.downloads: list[str] = []
        self.hold_empty_pull = 0.0
        # Lease only what the pull's hardware offer can run, as the worker API does
        # (off: lease blindly, as a server that ignores the offer would).
        self.match_hardware = False
        # Jobs whose last worker may still upload the log after a 404 (a
        # cancellation that keeps the outputs).
        self.log_grace: set[str] = set()
        # Status reports find nobody listening (the worker API is away).
        self.status_unreachable = False
        # Statuses answered 409, as a server refusing them for good would.
        self.refused_statuses: set[str] = set()

    def enqueue(self, queue_id: str, spec: dict[str, Any]) -> None:
        with self.lock:
            self.queue.append((queue_id, spec))

    def statuses_of(self, queue_id: str) -> list[str]:
        """Statuses reported for a job, repeated keep-alives collapsed."""
        with self.lock:
            reported = [status for qid, status, _ in self.statuses if qid == queue_id]
        collapsed: list[str] = []
        for status in reported:
            if not collapsed or collapsed[-1] != status:
                collapsed.append(status)
        return collapsed

    def final(self, queue_id: str) -> tuple[str, str | None] | None:
        with self.lock:
            for qid, status, details in reversed(self.statuses):
                if qid == queue_id and status in ("finished", "error", "queued"):
                    return status, details
        return None

    def outcome(self, queue_id: str) -> dict[str, Any] | None:
        """The outcome sent with the job's last status that had one."""
        with self.lock:
            reports = self.reports.get(queue_id, [])
            return reports[-1].get("outcome") if reports else None

    def uploads_of(self, queue_id: str) -> dict[tuple[str, str], bytes]:
        with self.lock:
            return {
                (u.kind, u.base_path): u.content for u in self.uploads if u.queue_id == queue_id
            }

    def handle(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if f"{url.scheme}://{url.host}" == STORAGE:
            assert "authorization" not in request.headers, "signed requests carry no token"
            return self._storage(request)
        if f"{url.scheme}://{url.host}" == AUTH:
            assert url.path == "/token" and request.method == "POST"
            return httpx.Response(201, json={"id_token": TOKEN, "expires_in": 3600})
        if request.method == "GET" and url.path == "/access_info":
            # Local auth: the runner then gets its token at AUTH's POST /token.
            cognito = {"user_pool_id": None, "client_id": None, "region": None}
            return httpx.Response(200, json={"cognito": cognito, "auth": "local"})
        assert request.headers.get("authorization") == f"Bearer {TOKEN}"
        parts = url.path.strip("/").split("/")
        if request.method == "GET" and parts == ["jobs"]:
            return self._pull(request)
        if request.method == "PUT" and parts[0] == "jobs" and parts[2:] == ["status"]:
            queue_id = parts[1]
            if self.status_unreachable:
                raise httpx.ConnectError("connection refused", request=request)
            if url.params["status"] in self.refused_statuses:
                return httpx.Response(409, json={"detail": "refused"})
            with self.lock:
                if queue_id in self.gone:
                    return httpx.Response(404, json={"detail": "not found"})
                self.statuses.append(
                    (queue_id, url.params["status"], url.params.get("runtime_details"))
                )
                if request.content:
                    assert request.headers["content-type"] == "application/json"
                    self.reports.setdefault(queue_id, []).append(json.loads(request.content))
            return httpx.Response(204)
        if request.method == "GET" and parts[0] == "files" and parts[-1] == "url":
            uri = "/".join(parts[1:-1])
            with self.lock:
                self.downloads.append(uri)
            return httpx.Response(
                200,
                json={"method": "GET", "url": f"{STORAGE}/get/{uri}", "headers": {}, "data": {}},
            )
        if request.method == "POST" and parts[0] == "jobs" and parts[2:] == ["files", "url"]:
            queue_id = parts[1]
            with self.lock:
                refused = queue_id in self.gone and not (
                    queue_id in self.log_grace and url.params["type"] == "log"
                )
            if refused:
                return httpx.Response(404, json={"detail": "not found"})
            key = f"{queue_id}|{url.params['type']}|{url.params['base_path']}"
            return httpx.Response(
                201,
                json={
                    "method": "POST",
                    "url": f"{STORAGE}/put",
                    "headers": {"x-signed": "yes"},
                    "data": {"key": key},
                },
            )
        return httpx.Response(404, json={"detail": f"no route {request.method} {url.path}"})

    def _pull(self, request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        limit = int(params["limit"])
        with self.lock:
            self.pull_params.append(params)
            fitting = [
                item for item in self.queue if not self.match_hardware or _fits(item[1], params)
            ]
            leased = fitting[:limit]
            self.queue = [item for item in self.queue if item not in leased]
            self.leased.extend(queue_id for queue_id, _ in leased)
        if not leased and self.hold_empty_pull:
            time.sleep(self.hold_empty_pull)
        return httpx.Response(200, json=dict(leased))

    def _storage(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path.startswith("/get/"):
            uri = path.removeprefix("/get/")
            if uri in self.broken_inputs or uri not in self.inputs:
                return httpx.Response(500, text="storage exploded")
            return httpx.Response(200, content=self.inputs[uri])
        if request.method == "POST" and path == "/put":
            assert request.headers["x-signed"] == "yes"
            form, content, filename = _parse_multipart(request)
            queue_id, kind, folder = form["key"].split("|")
            # base_path names the folder; the part's file name names the file.
            base_path = f"{folder}/{filename}" if folder else filename
            with self.lock:
                self.uploads.append(Upload(queue_id, kind, base_path, content, form))
            return httpx.Response(204)
        return httpx.Response(404)


def _fits(spec: dict[str, Any], offer: dict[str, str]) -> bool:
    """The worker API's matching rule, for the fake."""
    needs = HardwareSpec.model_validate(spec.get("hardware") or {})

    def at_most(needed: int | None, name: str) -> bool:
        return needed is None or needed <= int(offer.get(name, 0))

    return (
        at_most(needs.cpu_cores, "cpu_cores")
        and at_most(needs.memory, "memory")
        and at_most(needs.gpu_mem, "gpu_mem")
        and gpus_needed(needs) <= int(offer.get("gpus", 0))
        and needs.gpu_model in (None, offer.get("gpu_model"))
        and needs.gpu_archi in (None, offer.get("gpu_archi"))
    )


def _parse_multipart(request: httpx.Request) -> tuple[dict[str, str], bytes, str]:
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.read())
    form: dict[str, str] = {}
    content = b""
    filename = ""
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if name == "file":
            content = payload
            filename = str(part.get_filename())
        else:
            form[str(name)] = payload.decode()
    return form, content, filename


def job_spec(
    *,
    job_id: int = 7,
    cmd: list[str] | None = None,
    image: str = IMAGE,
    files_down: dict[str, str] | None = None,
    files_up: dict[str, str] | None = None,
    hardware: dict[str, Any] | None = None,
    timeout: int | None = None,
    container: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "app": {"cmd": cmd or ["run-tool", "--in", "/files/data"], "env": {"MODE": "fast"}},
        "handler": {
            "image_url": image,
            "files_down": files_down or {},
            "files_up": files_up
            if files_up is not None
            else {"output": "output", "log": "log", "artifact": "artifact"},
        },
        "meta": {"job_id": job_id, "date_created": "2024-05-01T12:00:00Z"},
        "hardware": hardware or {},
        "timeout": timeout,
        "container": container or {},
    }


@pytest.fixture
def api() -> FakeWorkerApi:
    return FakeWorkerApi()


@pytest.fixture
def settings() -> WorkerSettings:
    return WorkerSettings(
        api_url=API,
        auth_url=AUTH,
        username=WORKER,
        password="secret",
        timeout_job=0.05,
        timeout_status=0.05,
        wait=0,
        shutdown_grace=1,
        _env_file=None,
    )


@pytest.fixture
def fake_settings(tmp_path: Path) -> FakeSettings:
    """A fake host of 4 cores and 8192 MiB, job folders under ``tmp_path/jobs``."""
    return FakeSettings(
        path_base=tmp_path / "jobs",
        fake_cpu_cores=4,
        fake_memory=8192,
        fake_poll_interval=0.01,
        _env_file=None,
    )


@pytest.fixture
def client(api: FakeWorkerApi) -> Iterator[WorkerApiClient]:
    with WorkerApiClient(
        api_url=API,
        auth_url=AUTH,
        username=WORKER,
        password="secret",
        transport=httpx.MockTransport(api.handle),
        retry_delays=(0.01,),
    ) as client:
        yield client


A10 = tuple(GpuInfo(index=str(i), model="NVIDIA A10", memory=23028, archi="8.6") for i in range(2))


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@contextmanager
def running(runner: Runner) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        runner.hurry()
        thread.join(timeout=10)
        assert not thread.is_alive(), "runner did not stop"


def run_one(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    backend: FakeBackend,
    spec: dict[str, Any],
    queue_id: str = "q1",
) -> tuple[str, str | None]:
    """Enqueue one job, run a runner until its final status, return that."""
    api.enqueue(queue_id, spec)
    runner = Runner(settings, client, backend)
    with running(runner):
        wait_for(lambda: api.final(queue_id) is not None)
    final = api.final(queue_id)
    assert final is not None
    return final
