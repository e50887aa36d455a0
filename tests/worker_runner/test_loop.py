"""The runner loop against a stateful fake worker API (``httpx.MockTransport``) and
the in-package fake backend."""

from __future__ import annotations

import os
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

from labcloud.contract import HardwareSpec, JobStatus
from worker_runner.__main__ import main
from worker_runner.backends.base import RunHandle, RunResult
from worker_runner.backends.fake import FakeBackend, FakeProgram
from worker_runner.client import WorkerApiClient
from worker_runner.hardware import GpuInfo, HostHardware, gpus_needed
from worker_runner.loop import (
    LABEL_JOB_ID,
    LABEL_QUEUE_ID,
    LABEL_RUNNER,
    LABEL_WORKER,
    Outcome,
    Runner,
    RunnerAlreadyRunning,
    StatusReporter,
    runtime_details,
)
from worker_runner.settings import WorkerSettings
from worker_runner.staging import MARKER_NAME

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
def settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        api_url=API,
        auth_url=AUTH,
        username=WORKER,
        password="secret",
        path_base=tmp_path / "jobs",
        timeout_job=0.05,
        timeout_status=0.05,
        wait=0,
        shutdown_grace=1,
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


HOST = HostHardware(cpu_cores=4, memory=8192)


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
    hardware: HostHardware = HOST,
) -> tuple[str, str | None]:
    api.enqueue(queue_id, spec)
    runner = Runner(settings, client, backend, hardware)
    with running(runner):
        wait_for(lambda: api.final(queue_id) is not None)
    final = api.final(queue_id)
    assert final is not None
    return final


def test_happy_path(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient, tmp_path: Path
) -> None:
    settings.keep_job_folders = True
    api.inputs = {"u1/data/a.txt": b"A" * 3_000_000, "u1/config/c.yaml": b"k: v\n"}
    backend = FakeBackend(
        default=FakeProgram(
            log_lines=("hello from the tool",),
            files={
                "output/result.csv": b"1,2\n",
                "output/sub/x.bin": b"\x00\x01",
                "log/tool.log": b"detail\n",
            },
        )
    )
    spec = job_spec(
        files_down={"data/a.txt": "u1/data/a.txt", "config/sub/c.yaml": "u1/config/c.yaml"},
        hardware={"memory": 2048, "cpu_cores": 2},
    )

    final = run_one(api, settings, client, backend, spec)

    assert final == ("finished", None)
    assert api.statuses_of("q1") == ["preprocessing", "running", "postprocessing", "finished"]
    files = tmp_path / "jobs" / "q1" / "files"
    assert (files / "data" / "a.txt").read_bytes() == b"A" * 3_000_000
    assert (files / "config" / "sub" / "c.yaml").read_bytes() == b"k: v\n"
    assert (files / "artifact").is_dir()
    assert not list(files.rglob("*.part"))
    [request] = backend.requests
    assert request.image == IMAGE
    assert request.command == ("/bin/sh", "-c", "run-tool --in /files/data")
    assert request.env == {"MODE": "fast"}
    assert request.host_folder == files
    assert request.memory == 2048
    assert request.cpus == 2.0
    assert request.gpus == ()
    assert request.network == "none"
    assert request.labels == {
        LABEL_WORKER: WORKER,
        LABEL_RUNNER: settings.runner_id,
        LABEL_QUEUE_ID: "q1",
        LABEL_JOB_ID: "7",
    }
    assert request.pids_limit == 1024
    assert request.user is None
    assert request.read_only_root is False
    assert api.uploads_of("q1") == {
        ("output", "result.csv"): b"1,2\n",
        ("output", "sub/x.bin"): b"\x00\x01",
        ("log", "tool.log"): b"detail\n",
        ("log", "log.txt"): b"hello from the tool\n",
    }
    assert backend.removed and not backend.running()
    assert api.pull_params[0] == {
        "memory": "8192",
        "cpu_cores": "4",
        "gpus": "0",
        "gpu_mem": "0",
        "limit": "1",
    }


def test_job_folder_removed_and_keep_alive_bound_to_handling(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient, tmp_path: Path
) -> None:
    backend = FakeBackend(default=FakeProgram(duration=0.4))
    run_one(api, settings, client, backend, job_spec())

    # Keep-alives repeated the running status while the run lasted ...
    with api.lock:
        running_reports = [s for q, s, _ in api.statuses if s == "running"]
    assert len(running_reports) >= 3
    # ... and stopped with the handling: nothing follows the final status.
    with api.lock:
        count = len(api.statuses)
    time.sleep(0.3)
    with api.lock:
        assert len(api.statuses) == count
    assert api.statuses[-1][1] == "finished"
    assert not (tmp_path / "jobs" / "q1").exists()


def test_a_phase_missed_while_the_api_is_away_is_sent_before_the_next(
    api: FakeWorkerApi, client: WorkerApiClient
) -> None:
    """The API is away when ``postprocessing`` starts and back when the job ends:
    ``postprocessing`` still arrives, before ``finished``."""
    reporter = StatusReporter(client, "q1", interval=3600)  # no keep-alive in between
    reporter.set(JobStatus.RUNNING)
    api.status_unreachable = True
    reporter.set(JobStatus.POSTPROCESSING)
    api.status_unreachable = False
    reporter.finish(Outcome(JobStatus.FINISHED))
    assert api.statuses_of("q1") == ["running", "postprocessing", "finished"]


def test_the_keep_alive_delivers_a_missed_phase_in_order(
    api: FakeWorkerApi, client: WorkerApiClient
) -> None:
    with StatusReporter(client, "q1", interval=0.05) as reporter:
        reporter.set(JobStatus.PREPROCESSING)
        api.status_unreachable = True
        reporter.set(JobStatus.RUNNING)
        time.sleep(0.1)  # keep-alives fail meanwhile
        api.status_unreachable = False
        wait_for(lambda: api.statuses_of("q1") == ["preprocessing", "running"])
    # A phase the API refuses for good is not sent again.
    api.refused_statuses.add("postprocessing")
    reporter.set(JobStatus.POSTPROCESSING)
    reporter.finish(Outcome(JobStatus.FINISHED))
    assert api.statuses_of("q1") == ["preprocessing", "running", "finished"]


def test_error_exit_reports_log_tail(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    lines = tuple(f"line {n}" for n in range(100))
    backend = FakeBackend(
        default=FakeProgram(exit_code=3, log_lines=lines, files={"output/partial.txt": b"p"})
    )
    status, details = run_one(api, settings, client, backend, job_spec())

    assert status == "error"
    assert details is not None
    assert details.startswith("exit code 3\n")
    assert details.endswith("line 99")
    assert "line 60" in details and "line 59\n" not in details
    assert api.statuses_of("q1") == ["preprocessing", "running", "postprocessing", "error"]
    # Whatever the tool produced is still delivered, for debugging.
    assert ("output", "partial.txt") in api.uploads_of("q1")
    assert ("log", "log.txt") in api.uploads_of("q1")


def test_404_on_keep_alive_abandons_and_stops(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient, tmp_path: Path
) -> None:
    backend = FakeBackend(default=FakeProgram(duration=30))
    api.enqueue("q1", job_spec())
    runner = Runner(settings, client, backend, HOST)
    with running(runner):
        wait_for(lambda: backend.running())
        [handle] = backend.running()
        with api.lock:
            api.gone.add("q1")
            reported = len(api.statuses)
        wait_for(lambda: handle.id in backend.stopped, timeout=2)
        wait_for(lambda: not (tmp_path / "jobs" / "q1").exists())
        time.sleep(0.2)
    with api.lock:
        assert len(api.statuses) == reported, "nothing is reported after a 404"
    assert api.final("q1") is None
    assert handle.id in backend.removed
    assert api.uploads_of("q1") == {}


def test_cancelled_run_is_stopped_and_its_partial_log_kept(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient, tmp_path: Path
) -> None:
    backend = FakeBackend(
        default=FakeProgram(duration=30, log_lines=("step 1", "step 2"), files={"output/x": b"x"})
    )
    api.enqueue("q1", job_spec())
    runner = Runner(settings, client, backend, HOST)
    with running(runner):
        wait_for(lambda: backend.running() and api.statuses_of("q1")[-1:] == ["running"])
        [handle] = backend.running()
        # Cancelled with its outputs kept: keep-alives get 404, the log is wanted.
        with api.lock:
            api.gone.add("q1")
            api.log_grace.add("q1")
        cancelled_at = time.monotonic()
        wait_for(lambda: handle.id in backend.stopped, timeout=2)
        stopped_after = time.monotonic() - cancelled_at
        wait_for(lambda: ("log", "log.txt") in api.uploads_of("q1"))
        wait_for(lambda: not (tmp_path / "jobs" / "q1").exists())
    assert stopped_after < 1
    # Only the log: the outputs of a cancelled run are not delivered.
    assert api.uploads_of("q1") == {("log", "log.txt"): b"step 1\nstep 2\n"}
    assert api.final("q1") is None
    assert handle.id in backend.removed


def test_a_failing_handler_stops_its_keep_alive_at_once(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    class ExplodingBackend(FakeBackend):
        def wait(self, handle: RunHandle, timeout: float | None) -> RunResult | None:
            time.sleep(0.2)  # a few keep-alives go out first
            raise RuntimeError("the engine exploded")

    backend = ExplodingBackend(default=FakeProgram(duration=30))
    status, details = run_one(api, settings, client, backend, job_spec())
    assert status == "error"
    assert details is not None and details.startswith("worker error: RuntimeError: the engine")
    # The keep-alive thread ended with the handling: nothing follows the final status.
    assert not [t for t in threading.enumerate() if t.name == "keep-alive-q1"]
    with api.lock:
        count = len(api.statuses)
    time.sleep(0.3)
    with api.lock:
        assert len(api.statuses) == count
        assert api.statuses[-1][1] == "error"
    assert backend.removed


def test_timeout_stops_the_run(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    backend = FakeBackend(default=FakeProgram(duration=30, log_lines=("working",)))
    started = time.monotonic()
    status, details = run_one(api, settings, client, backend, job_spec(timeout=1))

    assert status == "error"
    assert details == "timed out after 1 s\nworking"
    assert time.monotonic() - started < 5
    assert backend.stopped
    assert ("log", "log.txt") in api.uploads_of("q1")


def test_oom_kill_is_reported(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    backend = FakeBackend(default=FakeProgram(oom_killed=True))
    status, details = run_one(api, settings, client, backend, job_spec(hardware={"memory": 512}))
    assert status == "error"
    assert details is not None
    assert details.startswith("memory limit exceeded: killed at 512 MiB")


def test_only_the_engine_says_out_of_memory(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    # A kill from outside (another stack's cleanup, `docker kill`) is said to be one.
    outside = FakeBackend(default=FakeProgram(outside_signal=9))
    status, details = run_one(api, settings, client, outside, job_spec(hardware={"memory": 128}))
    assert status == "error"
    assert details == (
        "killed from outside the runner: signal 9 sent through the container engine (exit code 137)"
    )

    # A SIGKILL the engine explains neither way does not blame the job's memory.
    killed = FakeBackend(default=FakeProgram(exit_code=137))
    status, details = run_one(
        api, settings, client, killed, job_spec(hardware={"memory": 256}), queue_id="q2"
    )
    assert status == "error"
    assert details == (
        "exit code 137: killed with SIGKILL, not by the runner; the container engine "
        "reported no out-of-memory kill"
    )
    assert "memory limit" not in details


def test_download_failure_fails_the_job(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    api.inputs = {"u1/data/ok.txt": b"ok"}
    api.broken_inputs = {"u1/data/bad.txt"}
    backend = FakeBackend()
    spec = job_spec(files_down={"data/ok.txt": "u1/data/ok.txt", "data/bad.txt": "u1/data/bad.txt"})
    status, details = run_one(api, settings, client, backend, spec)

    assert status == "error"
    assert details is not None
    assert details.startswith("download failed: u1/data/bad.txt")
    assert api.statuses_of("q1") == ["preprocessing", "error"]
    assert backend.requests == []


@pytest.mark.parametrize("destination", ["../evil.txt", "data/../../evil.txt", "/etc/evil"])
def test_destination_outside_job_folder_is_refused(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    tmp_path: Path,
    destination: str,
) -> None:
    api.inputs = {"u1/data/x": b"x"}
    backend = FakeBackend()
    status, details = run_one(
        api, settings, client, backend, job_spec(files_down={destination: "u1/data/x"})
    )
    assert status == "error"
    assert details is not None and "escapes the job folder" in details
    assert api.downloads == []
    assert backend.requests == []
    assert not (tmp_path / "jobs" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_missing_image_fails_the_job(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    backend = FakeBackend(missing_images={IMAGE})
    status, details = run_one(api, settings, client, backend, job_spec())
    assert status == "error"
    assert details is not None and f"image {IMAGE} is not available" in details
    assert api.statuses_of("q1") == ["preprocessing", "running", "error"]


def test_gpu_job_on_host_without_gpu(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    # Only a server that ignores the offer (gpus=0) sends such a job: it is refused
    # at once, before anything is staged or started.
    backend = FakeBackend()
    status, details = run_one(api, settings, client, backend, job_spec(hardware={"gpu_mem": 4000}))
    assert status == "error"
    assert details == "the job needs a GPU but this worker has none"
    assert backend.requests == []
    assert api.statuses_of("q1") == ["error"]
    assert {p["gpus"] for p in api.pull_params} == {"0"}
    assert {p["gpu_mem"] for p in api.pull_params} == {"0"}


A10 = tuple(GpuInfo(index=str(i), model="NVIDIA A10", memory=23028, archi="8.6") for i in range(2))


def test_gpu_job_gets_its_gpu(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    backend = FakeBackend()
    status, _ = run_one(
        api,
        settings,
        client,
        backend,
        job_spec(hardware={"gpu_model": "NVIDIA A10"}),
        hardware=HostHardware(cpu_cores=4, memory=8192, gpus=A10),
    )
    assert status == "finished"
    assert backend.requests[0].gpus == ("0",)
    assert api.pull_params[0] == {
        "memory": "8192",
        "cpu_cores": "4",
        "gpus": "2",
        "gpu_mem": "23028",
        "gpu_model": "NVIDIA A10",
        "gpu_archi": "8.6",
        "limit": "1",
    }


def test_gpu_jobs_share_the_gpus_and_wait_for_free_ones(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    settings.slots = 4
    api.match_hardware = True
    backend = FakeBackend(
        {"one": FakeProgram(duration=0.6), "two": FakeProgram(duration=0.1)},
        default=FakeProgram(duration=0.6),
    )
    api.enqueue("g1", job_spec(job_id=1, image="one", hardware={"gpus": 1}))
    api.enqueue("g2", job_spec(job_id=2, image="one", hardware={"gpu_mem": 20000}))
    api.enqueue("g3", job_spec(job_id=3, image="two", hardware={"gpus": 2}))
    api.enqueue("c1", job_spec(job_id=4, image="cpu"))
    runner = Runner(settings, client, backend, HostHardware(cpu_cores=4, memory=8192, gpus=A10))
    with running(runner):
        wait_for(lambda: all(api.final(q) for q in ("g1", "g2", "g3", "c1")))
    assert {q: api.final(q) for q in ("g1", "g2", "g3", "c1")} == dict.fromkeys(
        ("g1", "g2", "g3", "c1"), ("finished", None)
    )
    gpus = {request.labels[LABEL_QUEUE_ID]: request.gpus for request in backend.requests}
    # The first two jobs got a GPU each, the CPU job none; the two-GPU job waited
    # until both were free again.
    assert {gpus["g1"], gpus["g2"]} == {("0",), ("1",)}
    assert gpus["c1"] == ()
    assert gpus["g3"] == ("0", "1")
    assert [r.labels[LABEL_QUEUE_ID] for r in backend.requests][-1] == "g3"
    # While both GPUs were taken, pulls offered none.
    assert any(p["gpus"] == "0" and p["gpu_mem"] == "0" for p in api.pull_params)
    assert all("gpu_model" not in p for p in api.pull_params if p["gpus"] == "0")


def test_invalid_spec_fails_only_that_job(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    api.enqueue("bad", {"app": {"cmd": "not a list"}})
    status, _ = run_one(api, settings, client, FakeBackend(), job_spec(), queue_id="good")
    assert status == "finished"
    final = api.final("bad")
    assert final is not None and final[0] == "error"
    assert final[1] is not None and final[1].startswith("invalid job spec")


def test_shutdown_hands_back_running_job(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient, tmp_path: Path
) -> None:
    settings.shutdown_grace = 0.3
    backend = FakeBackend(default=FakeProgram(duration=30))
    api.enqueue("q1", job_spec())
    runner = Runner(settings, client, backend, HOST)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(lambda: backend.running())
    [handle] = backend.running()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert api.final("q1") == ("queued", None)
    assert api.statuses_of("q1") == ["preprocessing", "running", "queued"]
    assert handle.id in backend.stopped and handle.id in backend.removed
    assert not (tmp_path / "jobs" / "q1").exists()


def test_shutdown_lets_a_short_job_finish(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    settings.shutdown_grace = 5
    backend = FakeBackend(default=FakeProgram(duration=0.5))
    api.enqueue("q1", job_spec())
    runner = Runner(settings, client, backend, HOST)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(lambda: backend.running())
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert api.final("q1") == ("finished", None)
    assert backend.stopped == []


def test_second_signal_ends_the_grace(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    settings.shutdown_grace = 60
    backend = FakeBackend(default=FakeProgram(duration=30))
    api.enqueue("q1", job_spec())
    runner = Runner(settings, client, backend, HOST)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(lambda: backend.running())
    stop.set()
    time.sleep(0.2)
    assert thread.is_alive()
    runner.hurry()
    thread.join(timeout=3)
    assert not thread.is_alive()
    assert api.final("q1") == ("queued", None)


def test_start_removes_leftovers_of_this_worker_only(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient, tmp_path: Path
) -> None:
    backend = FakeBackend()
    mine = backend.add_leftover(
        {LABEL_WORKER: WORKER, LABEL_RUNNER: settings.runner_id, LABEL_QUEUE_ID: "old"}
    )
    theirs = backend.add_leftover({LABEL_WORKER: "worker-2", LABEL_RUNNER: "0123456789abcdef"})
    # Another stack's runner on the same engine, with the same account name.
    namesake = backend.add_leftover({LABEL_WORKER: WORKER, LABEL_RUNNER: "fedcba9876543210"})
    unlabelled = backend.add_leftover({LABEL_WORKER: WORKER})
    jobs = tmp_path / "jobs"
    (jobs / "old" / "files").mkdir(parents=True)
    (jobs / "old" / MARKER_NAME).write_text(settings.runner_id)
    (jobs / "other").mkdir()
    (jobs / "other" / MARKER_NAME).write_text("0123456789abcdef")
    (jobs / "by-name").mkdir()
    (jobs / "by-name" / MARKER_NAME).write_text(WORKER)
    (jobs / "unrelated").mkdir()

    runner = Runner(settings, client, backend, HOST)
    with running(runner):
        wait_for(lambda: mine.id in backend.removed)
    assert not {theirs.id, namesake.id, unlabelled.id} & set(backend.removed)
    assert not (jobs / "old").exists()
    for kept in ("other", "by-name", "unrelated"):
        assert (jobs / kept).is_dir()


def test_a_second_runner_of_the_same_identity_refuses_to_start(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    # It would remove the first one's containers and job folders as its leftovers.
    backend = FakeBackend(default=FakeProgram(duration=30))
    api.enqueue("q1", job_spec())
    with running(Runner(settings, client, backend, HOST)):
        wait_for(lambda: backend.running())
        second = Runner(settings, client, backend, HOST)
        with pytest.raises(RunnerAlreadyRunning, match="another runner of worker-1 uses"):
            second.run(threading.Event())
        assert backend.running() and not backend.removed
    # Once the first one stopped, a runner of that identity starts again.
    with running(Runner(settings, client, backend, HOST)):
        pass


def test_runner_identity_is_per_folder_and_account(tmp_path: Path) -> None:
    def identity(username: str, path_base: Path, host_base: Path | None = None) -> str:
        return WorkerSettings(
            api_url=API,
            auth_url=AUTH,
            username=username,
            password="secret",
            path_base=path_base,
            path_host_base=host_base,
            _env_file=None,
        ).runner_id

    one = identity(WORKER, tmp_path / "stack-1" / "jobs")
    assert len(one) == 16 and int(one, 16) >= 0
    assert identity(WORKER, tmp_path / "stack-1" / "x" / ".." / "jobs") == one
    assert identity(WORKER, tmp_path / "stack-2" / "jobs") != one
    assert identity("worker-2", tmp_path / "stack-1" / "jobs") != one
    # Runners in containers: the same PATH_BASE inside, other folders on the host.
    inside = Path("/jobs")
    assert identity(WORKER, inside, Path("/srv/a")) != identity(WORKER, inside, Path("/srv/b"))


def test_container_confinement_comes_from_the_spec(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    settings.container_pids_limit = 200
    backend = FakeBackend()
    assert run_one(api, settings, client, backend, job_spec())[0] == "finished"
    spec = job_spec(container={"pids_limit": 50, "user": f"{os.geteuid()}", "read_only_root": True})
    assert run_one(api, settings, client, backend, spec, queue_id="q2")[0] == "finished"
    default, confined = backend.requests
    assert (default.pids_limit, default.user, default.read_only_root) == (200, None, False)
    assert (confined.pids_limit, confined.user, confined.read_only_root) == (
        50,
        f"{os.geteuid()}",
        True,
    )


def test_slots_run_jobs_in_parallel(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    settings.slots = 2
    backend = FakeBackend(default=FakeProgram(duration=1.0))
    api.enqueue("q1", job_spec(job_id=1))
    api.enqueue("q2", job_spec(job_id=2))
    runner = Runner(settings, client, backend, HOST)
    started = time.monotonic()
    with running(runner):
        wait_for(lambda: api.final("q1") and api.final("q2"))
    assert time.monotonic() - started < 1.8
    # A job that names no need gets half of the host; the second pull offered what
    # the first job left.
    assert [(r.memory, r.cpus) for r in backend.requests] == [(4096, 2.0), (4096, 2.0)]
    assert (api.pull_params[0]["memory"], api.pull_params[1]["memory"]) == ("8192", "4096")


def test_jobs_run_together_only_when_they_fit(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    settings.slots = 4
    api.match_hardware = True
    backend = FakeBackend(default=FakeProgram(duration=0.5))
    api.enqueue("big", job_spec(job_id=1, hardware={"memory": 6000, "cpu_cores": 3}))
    api.enqueue("also-big", job_spec(job_id=2, hardware={"memory": 4000}))
    api.enqueue("light", job_spec(job_id=3))
    runner = Runner(settings, client, backend, HOST)
    with running(runner):
        wait_for(lambda: all(api.final(q) for q in ("big", "also-big", "light")))
    # The light job fits beside the big one, in what memory is left; the second
    # big job waits until the first one ended and gave its memory back.
    assert api.leased == ["big", "light", "also-big"]
    [light] = [r for r in backend.requests if r.labels[LABEL_QUEUE_ID] == "light"]
    assert (light.memory, light.cpus) == (8192 // 4, 1.0)  # an even share, less than was left
    assert api.pull_params[1]["memory"] == str(8192 - 6000)
    assert api.pull_params[1]["cpu_cores"] == "1"
    with api.lock:
        sequence = [(q, status) for q, status, _ in api.statuses]
    assert sequence.index(("big", "finished")) < sequence.index(("also-big", "running"))


def test_long_poll_repolls_at_once_and_sleeps_when_ignored(
    api: FakeWorkerApi, settings: WorkerSettings, client: WorkerApiClient
) -> None:
    # A server that honours wait: the runner polls again without sleeping.
    settings.wait = 0.1
    settings.timeout_job = 30
    api.hold_empty_pull = 0.1
    runner = Runner(settings, client, FakeBackend(), HOST)
    with running(runner):
        time.sleep(0.55)
    assert len(api.pull_params) >= 3
    assert api.pull_params[0]["wait"] == "0.1"

    # A server that ignores wait: the runner sleeps TIMEOUT_JOB between polls.
    quick = FakeWorkerApi()
    settings.timeout_job = 0.3
    with WorkerApiClient(
        api_url=API,
        auth_url=AUTH,
        username=WORKER,
        password="secret",
        transport=httpx.MockTransport(quick.handle),
    ) as quick_client:
        runner = Runner(settings, quick_client, FakeBackend(), HOST)
        with running(runner):
            time.sleep(0.5)
    assert 1 <= len(quick.pull_params) <= 2


def test_runtime_details_fit_in_a_query_parameter() -> None:
    tail = "\n".join("é%&" * 40 for _ in range(40))
    text = runtime_details("exit code 1", tail, max_encoded=2000)
    assert text.startswith("exit code 1\n")
    assert len(httpx.QueryParams({"d": text}).__str__()) <= 2100
    assert tail.endswith(text.split("\n", 1)[1])


def test_main_refuses_missing_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("API_URL", "AUTH_URL", "USERNAME", "PASSWORD", "TIMEOUT_JOB"):
        monkeypatch.delenv(name, raising=False)
    env_file = tmp_path / "worker.env"
    env_file.write_text("API_URL=ftp://nowhere\nTIMEOUT_JOB=soon\n")
    assert main(["--env-file", str(env_file)]) == 2
    err = capsys.readouterr().err
    for name in ("API_URL", "AUTH_URL", "USERNAME", "PASSWORD", "TIMEOUT_JOB"):
        assert name in err
    assert main(["--env-file", str(tmp_path / "missing.env")]) == 2
    assert "env file not found" in capsys.readouterr().err


def test_settings_from_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("PATH_BASE", "PATH_HOST_BASE", "SLOTS", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    env_file = tmp_path / "worker.env"
    env_file.write_text(
        "API_URL=http://api:8001/\nAUTH_URL=https://users.example\nUSERNAME=w\n"
        "PASSWORD=pw\nPATH_BASE=jobs\nSLOTS=2\n"
    )
    settings = WorkerSettings(_env_file=env_file)
    assert settings.api_url == "http://api:8001"
    assert settings.path_base == tmp_path / "jobs"
    assert settings.host_base == tmp_path / "jobs"
    assert settings.slots == 2
    assert settings.container_network == "none"
    assert settings.password.get_secret_value() == "pw"
    assert "pw" not in repr(settings)
