"""The Docker backend against the real engine, with a tiny busybox image built
locally (no registry needed). Skipped (by tests/conftest.py) when no engine answers."""

from __future__ import annotations

import posixpath
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from docker.errors import ImageNotFound
from docker.types import DeviceRequest

from labcloud.contract import ContainerSpec
from worker_runner.backends.base import BackendError, ImageUnavailable, Placement, RunRequest
from worker_runner.backends.docker import DockerBackend, DockerSettings
from worker_runner.client import WorkerApiClient
from worker_runner.dispatcher import Runner, runner_identity
from worker_runner.hardware import HostHardware
from worker_runner.job import LABEL_WORKER
from worker_runner.settings import WorkerSettings

# The tag names the applet set: an image imported with fewer applets is not reused.
IMAGE = "labcloud-test/busybox:2"
BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "echo", "cat", "sleep", "dd", "ls", "mkdir", "head", "true", "false", "env", "id",
    "touch",
)  # fmt: skip


# tests/conftest.py skips tests marked ``docker`` when `docker info` fails.
pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(engine: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A static busybox with its applets as symlinks, imported as ``IMAGE``."""
    try:
        engine.images.get(IMAGE)
        return IMAGE
    except ImageNotFound:
        pass
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} (a static busybox) is needed to build the test image")
    archive = tmp_path_factory.mktemp("image") / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        for folder in ("tmp", "files"):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777
            tar.addfile(info)
    repository, tag = IMAGE.split(":")
    engine.api.import_image_from_file(str(archive), repository=repository, tag=tag)
    return IMAGE


def docker_settings(path_base: Path, **settings: Any) -> DockerSettings:
    return DockerSettings(path_base=path_base, _env_file=None, **settings)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[DockerBackend]:
    backend = DockerBackend.from_settings(docker_settings(tmp_path / "jobs"))
    yield backend
    backend.close()


@pytest.fixture
def labels(backend: DockerBackend) -> Iterator[dict[str, str]]:
    """Labels unique to one test; whatever carries them is removed afterwards."""
    labels = {LABEL_WORKER: f"test-{uuid.uuid4().hex[:12]}"}
    yield labels
    backend.remove_leftovers(labels)


def request(
    image: str,
    script: str,
    folder: Path,
    *,
    memory: int | None = None,
    cpus: float | None = None,
    gpu_ids: tuple[str, ...] = (),
    **options: Any,
) -> RunRequest:
    placement = Placement(memory=memory, cpus=cpus, gpus=len(gpu_ids), gpu_ids=gpu_ids)
    return RunRequest(
        image=image,
        command=("/bin/sh", "-c", script),
        folder=folder,
        placement=placement,
        **options,
    )


def test_run_writes_files_and_logs(
    backend: DockerBackend, image: str, tmp_path: Path, labels: dict[str, str]
) -> None:
    (tmp_path / "in.txt").write_text("input\n")
    handle = backend.start(
        request(
            image,
            "cat /files/in.txt; echo to-stderr >&2; echo $GREETING > /files/out.txt",
            tmp_path,
            env={"GREETING": "hello"},
            labels=labels,
            memory=64,
            cpus=1.0,
        )
    )
    result = backend.wait(handle, timeout=20)
    assert result is not None and result.exit_code == 0 and not result.oom_killed
    # stdout and stderr are separate pipes: their relative order is not kept.
    output = b"".join(backend.stream_logs(handle))
    assert sorted(output.splitlines()) == [b"input", b"to-stderr"]
    assert (tmp_path / "out.txt").read_text() == "hello\n"
    backend.remove(handle)
    assert backend.find_leftovers(labels) == []


def test_container_is_locked_down(
    backend: DockerBackend,
    engine: docker.DockerClient,
    image: str,
    tmp_path: Path,
    labels: dict[str, str],
) -> None:
    handle = backend.start(request(image, "exit 3", tmp_path, labels=labels, memory=100, cpus=0.5))
    result = backend.wait(handle, timeout=20)
    assert result is not None and result.exit_code == 3
    host_config = engine.api.inspect_container(handle.id)["HostConfig"]
    assert host_config["Init"] is True
    assert host_config["CapDrop"] == ["ALL"]
    assert host_config["SecurityOpt"] == ["no-new-privileges"]
    assert host_config["NetworkMode"] == "none"
    assert host_config["Memory"] == 100 * 1024 * 1024
    assert host_config["NanoCpus"] == 500_000_000
    assert host_config["Binds"] == [f"{tmp_path}:/files:rw"]
    assert host_config["ReadonlyRootfs"] is False


def test_pids_limit_stops_a_fork_loop(
    backend: DockerBackend,
    engine: docker.DockerClient,
    image: str,
    tmp_path: Path,
    labels: dict[str, str],
) -> None:
    # At most 64 forks, each a 30 s sleep the container's end takes along: bounded
    # even if the limit did not hold.
    script = (
        "n=0; i=0; while [ $i -lt 64 ]; do i=$((i+1)); "
        "(sleep 30 &) 2>/dev/null && n=$((n+1)); done; echo started $n"
    )
    handle = backend.start(
        request(image, script, tmp_path, labels=labels, container=ContainerSpec(pids_limit=16))
    )
    result = backend.wait(handle, timeout=60)
    assert result is not None
    assert engine.api.inspect_container(handle.id)["HostConfig"]["PidsLimit"] == 16
    output = b"".join(backend.stream_logs(handle)).decode()
    started = int(output.split("started ")[1].split()[0])
    # init, the shell and its subshells share the 16.
    assert 0 < started < 16, output
    backend.remove(handle)


def test_user_and_read_only_root(
    backend: DockerBackend,
    engine: docker.DockerClient,
    image: str,
    tmp_path: Path,
    labels: dict[str, str],
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    files.chmod(0o777)
    script = (
        "id -u; id -g; "
        "touch /root-file 2>/dev/null && echo root-writable; "
        "touch /tmp/scratch && echo tmp-writable; "
        "echo result > /files/out.txt && echo files-writable"
    )
    handle = backend.start(
        request(
            image,
            script,
            files,
            labels=labels,
            container=ContainerSpec(user="1234:2345", read_only_root=True),
        )
    )
    result = backend.wait(handle, timeout=30)
    assert result is not None and result.exit_code == 0
    output = b"".join(backend.stream_logs(handle)).decode().split()
    assert output == ["1234", "2345", "tmp-writable", "files-writable"]
    assert (files / "out.txt").stat().st_uid == 1234
    host_config = engine.api.inspect_container(handle.id)["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,mode=1777"}
    backend.remove(handle)


def test_only_the_assigned_gpus_are_requested(tmp_path: Path) -> None:
    # What the engine is asked for (the container itself needs the NVIDIA runtime).
    backend = DockerBackend(docker_settings(tmp_path), client=None)
    options = backend._create_options(request("img", "true", tmp_path, gpu_ids=("1", "3")))
    assert options["device_requests"] == [
        DeviceRequest(device_ids=["1", "3"], capabilities=[["gpu"]])
    ]
    assert "device_requests" not in backend._create_options(request("img", "true", tmp_path))


def _engine_time(value: str) -> datetime:
    """A time as the engine writes it (RFC 3339 with nanoseconds)."""
    match = re.fullmatch(r"(.*T[0-9:]+)(?:\.([0-9]+))?Z", value)
    assert match is not None, value
    fraction = (match.group(2) or "0")[:6].ljust(6, "0")
    return datetime.fromisoformat(f"{match.group(1)}.{fraction}+00:00")


def test_the_end_of_a_container_is_seen_at_once(
    backend: DockerBackend,
    engine: docker.DockerClient,
    image: str,
    tmp_path: Path,
    labels: dict[str, str],
) -> None:
    # The engine's blocking wait completes the run's future as the container ends,
    # where polling every 0.25 s saw it 0.125 s late on average.
    delays = []
    for _ in range(3):
        handle = backend.start(request(image, "sleep 0.5", tmp_path, labels=labels))
        seen: dict[str, datetime] = {}

        def note(_: object, at: dict[str, datetime] = seen) -> None:
            at.setdefault("at", datetime.now(UTC))

        ended = backend.follow(handle)
        ended.add_done_callback(note)
        result = ended.result(timeout=30)
        assert result.exit_code == 0
        state = engine.api.inspect_container(handle.id)["State"]
        delays.append((seen["at"] - _engine_time(state["FinishedAt"])).total_seconds())
        backend.remove(handle)
    assert -0.05 < min(delays) < 0.1, delays


def test_stop_is_prompt(
    backend: DockerBackend, image: str, tmp_path: Path, labels: dict[str, str]
) -> None:
    handle = backend.start(request(image, "sleep 300", tmp_path, labels=labels))
    assert backend.wait(handle, timeout=0.3) is None
    started = time.monotonic()
    backend.stop(handle)
    result = backend.wait(handle, timeout=5)
    assert time.monotonic() - started < 2
    assert result is not None and result.exit_code != 0
    # Its own stop is not a kill from outside.
    assert result.outside_signal is None and not result.oom_killed
    backend.remove(handle)
    backend.stop(handle)  # already gone: not an error


def test_memory_limit_kill_is_reported_as_the_engine_says(
    backend: DockerBackend,
    engine: docker.DockerClient,
    image: str,
    tmp_path: Path,
    labels: dict[str, str],
) -> None:
    # The engine loses the OOM flag of a container that dies at once now and then
    # (measured: 5 of 60 with 4 at a time; none of 15 one at a time): the result
    # follows the engine every time, and a few tries see it flagged.
    flagged = False
    for _ in range(4):
        handle = backend.start(
            request(
                image,
                "dd if=/dev/zero of=/dev/null bs=64M count=1",
                tmp_path,
                labels=labels,
                memory=16,
            )
        )
        result = backend.wait(handle, timeout=30)
        assert result is not None and result.exit_code == 137
        state = engine.api.inspect_container(handle.id)["State"]
        assert result.oom_killed is state["OOMKilled"]
        assert result.outside_signal is None
        backend.remove(handle)
        if result.oom_killed:
            flagged = True
            break
    assert flagged, "the engine never reported the OOM kill"


def test_kill_from_outside_is_not_out_of_memory(
    backend: DockerBackend,
    engine: docker.DockerClient,
    image: str,
    tmp_path: Path,
    labels: dict[str, str],
) -> None:
    handle = backend.start(request(image, "sleep 300", tmp_path, labels=labels, memory=64))
    assert backend.wait(handle, timeout=0.3) is None
    engine.api.kill(handle.id)  # what `docker kill` does
    result = backend.wait(handle, timeout=30)
    assert result is not None
    assert (result.exit_code, result.oom_killed, result.outside_signal) == (137, False, 9)
    backend.remove(handle)


def test_leftovers_are_found_by_label(
    backend: DockerBackend, image: str, tmp_path: Path, labels: dict[str, str]
) -> None:
    first = backend.start(request(image, "sleep 300", tmp_path, labels=labels))
    second = backend.start(request(image, "true", tmp_path, labels=labels))
    found = {handle.id for handle in backend.find_leftovers(labels)}
    assert found == {first.id, second.id}
    assert backend.remove_leftovers(labels) == 2
    assert backend.find_leftovers(labels) == []


def test_missing_image_that_cannot_be_pulled(backend: DockerBackend, tmp_path: Path) -> None:
    with pytest.raises(ImageUnavailable, match="labcloud-test/does-not-exist:never"):
        backend.start(request("labcloud-test/does-not-exist:never", "true", tmp_path))


def test_failed_gpu_request_leaves_no_container(
    backend: DockerBackend, image: str, tmp_path: Path, labels: dict[str, str]
) -> None:
    try:
        handle = backend.start(request(image, "true", tmp_path, labels=labels, gpu_ids=("0",)))
    except BackendError as exc:
        assert "could not start the container" in exc.message
        assert backend.find_leftovers(labels) == []
    else:
        backend.remove(handle)
        pytest.skip("this host can run GPU containers")


class StubApi:
    """The worker API and storage for a runner on the real engine: serves one input,
    records statuses and uploads; ``gone`` makes status reports answer 404 and
    ``log_grace`` still takes the log of a gone job (a cancellation that keeps it)."""

    def __init__(self, jobs: dict[str, dict[str, Any]]) -> None:
        self.queue = [jobs]
        self.statuses: list[str] = []
        self.uploads: dict[str, bytes] = {}
        self.gone = False
        self.log_grace = False

    def handler(self, req: httpx.Request) -> httpx.Response:
        path, params = req.url.path, req.url.params
        if req.url.host == "auth":
            return httpx.Response(201, json={"id_token": "t", "expires_in": 3600})
        if req.url.host == "storage":
            if req.method == "GET":
                return httpx.Response(200, content=b"payload\n")
            body = req.read()
            # The URL names the folder (DECODE's base_path); the part names the file.
            filename = re.search(rb'filename="([^"]*)"', body)
            assert filename is not None, body[:200]
            name = posixpath.join(req.url.params["name"], filename.group(1).decode())
            self.uploads[name] = body[body.index(b"\r\n\r\n") + 4 : body.rindex(b"\r\n--")]
            return httpx.Response(204)
        if path == "/jobs":
            return httpx.Response(200, json=self.queue.pop() if self.queue else {})
        if path.endswith("/status"):
            if self.gone:
                return httpx.Response(404, json={"detail": "not found"})
            self.statuses.append(params["status"])
            return httpx.Response(204)
        if path.endswith("/files/url") and req.method == "POST":
            if self.gone and not (self.log_grace and params["type"] == "log"):
                return httpx.Response(404, json={"detail": "not found"})
            name = f"{params['type']}/{params['base_path']}"
            url = f"http://storage/put?name={name}"
            return httpx.Response(
                201, json={"method": "POST", "url": url, "headers": {}, "data": {}}
            )
        url = "http://storage/get"
        return httpx.Response(200, json={"method": "GET", "url": url, "headers": {}, "data": {}})


def runner_settings(worker: str) -> WorkerSettings:
    return WorkerSettings(
        api_url="http://api",
        auth_url="http://auth",
        username=worker,
        password="pw",
        timeout_job=0.05,
        timeout_status=0.2,
        wait=0,
        shutdown_grace=0,
        _env_file=None,
    )


@contextmanager
def docker_runner(
    backend: DockerBackend, api: StubApi, worker: str, path_base: Path
) -> Iterator[Runner]:
    """A runner on the real engine (``backend``'s connection, job folders under
    ``path_base``, one core and 1 GiB), stopped (its jobs handed back) on exit."""
    settings = runner_settings(worker)
    backend = DockerBackend(
        docker_settings(path_base), backend.client, hardware=HostHardware(cpu_cores=1, memory=1024)
    )
    client = WorkerApiClient(
        api_url=settings.api_url,
        auth_url=settings.auth_url,
        username=settings.username,
        password=settings.password,
        transport=httpx.MockTransport(api.handler),
    )
    runner = Runner(settings, client, backend)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield runner
    finally:
        stop.set()
        runner.hurry()
        thread.join(timeout=20)
        client.close()
    assert not thread.is_alive()


def until(condition: Callable[[], object], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def docker_job(image: str, cmd: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "app": {"cmd": cmd, "env": {}},
        "handler": {
            "image_url": image,
            "files_down": {"data/in.txt": "u/data/in.txt"},
            "files_up": {"output": "output"},
        },
        "meta": {"job_id": 5, "date_created": "2024-01-01T00:00:00Z"},
        "hardware": {"memory": 64, "cpu_cores": 1},
        **extra,
    }


def test_runner_runs_a_job_in_docker(
    backend: DockerBackend, image: str, tmp_path: Path, labels: dict[str, str]
) -> None:
    cmd = [
        "mkdir -p /files/output/sub &&",
        "cat /files/data/in.txt",
        "| tee /files/output/sub/copy.txt",
    ]
    api = StubApi({"q-docker": docker_job(image, cmd)})
    with docker_runner(backend, api, labels[LABEL_WORKER], tmp_path / "jobs"):
        until(lambda: "finished" in api.statuses or "error" in api.statuses)
    assert api.statuses[-1] == "finished"
    assert api.uploads == {"output/sub/copy.txt": b"payload\n", "log/log.txt": b"payload\n"}
    assert backend.find_leftovers(labels) == []
    assert not (tmp_path / "jobs" / "q-docker").exists()


def test_time_limit_stops_the_container(
    backend: DockerBackend, image: str, tmp_path: Path, labels: dict[str, str]
) -> None:
    api = StubApi({"q-slow": docker_job(image, ["echo started;", "sleep 60"], timeout=1)})
    started = time.monotonic()
    with docker_runner(backend, api, labels[LABEL_WORKER], tmp_path / "jobs"):
        until(lambda: "error" in api.statuses or "finished" in api.statuses)
    assert time.monotonic() - started < 15
    assert api.statuses[-1] == "error"
    assert api.uploads["log/log.txt"] == b"started\n"
    assert backend.find_leftovers(labels) == []


def test_cancelled_container_stops_at_once_and_keeps_its_log(
    backend: DockerBackend, image: str, tmp_path: Path, labels: dict[str, str]
) -> None:
    api = StubApi({"q-cancel": docker_job(image, ["echo partial;", "sleep 60"])})
    with docker_runner(backend, api, labels[LABEL_WORKER], tmp_path / "jobs"):
        until(lambda: "running" in api.statuses and backend.find_leftovers(labels))
        until(lambda: b"partial" in (tmp_path / "jobs" / "q-cancel" / "log.txt").read_bytes())
        api.log_grace = True
        api.gone = True
        cancelled = time.monotonic()
        until(lambda: not backend.find_leftovers(labels), timeout=10)
        gone_after = time.monotonic() - cancelled
        until(lambda: "log/log.txt" in api.uploads)
    # Keep-alives every 0.2 s, a container stopped with SIGKILL through init.
    assert gone_after < 3
    assert api.uploads == {"log/log.txt": b"partial\n"}
    assert api.statuses[-1] == "running"


LEFTOVER_SCRIPT = """
import sys, time
from pathlib import Path
from worker_runner.backends.base import RunRequest
from worker_runner.backends.docker import DockerBackend, DockerSettings
from worker_runner.dispatcher import runner_identity
from worker_runner.job import LABEL_QUEUE_ID, LABEL_RUNNER, LABEL_WORKER
from worker_runner.staging import JobFolder

worker, image, base = sys.argv[1], sys.argv[2], Path(sys.argv[3])
backend = DockerBackend.from_settings(DockerSettings(path_base=base, _env_file=None))
runner_id = runner_identity(worker, backend)
folder = JobFolder.for_job(base, "q-crash")
folder.create(runner_id)
handle = backend.start(
    RunRequest(
        image=image,
        command=("/bin/sh", "-c", "sleep 300"),
        folder=folder.files,
        labels={LABEL_WORKER: worker, LABEL_RUNNER: runner_id, LABEL_QUEUE_ID: "q-crash"},
    )
)
print(handle.id, flush=True)
time.sleep(300)
"""


def test_start_removes_what_a_killed_runner_left(
    backend: DockerBackend, image: str, tmp_path: Path, labels: dict[str, str]
) -> None:
    # A runner process starts a job's container and is killed with SIGKILL: the
    # container keeps running and the job folder stays, until the next start of a
    # runner of that worker removes both (another worker's container stays).
    worker = labels[LABEL_WORKER]
    base = tmp_path / "jobs"
    process = subprocess.Popen(
        [sys.executable, "-c", LEFTOVER_SCRIPT, worker, image, str(base)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert process.stdout is not None
        container_id = process.stdout.readline().decode().strip()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    assert container_id, "the runner process did not start its container"
    [leftover] = backend.find_leftovers(labels)
    assert leftover.id == container_id
    assert backend.wait(leftover, timeout=0.1) is None, "still running after the kill"
    assert (base / "q-crash").is_dir()
    bystander = {LABEL_WORKER: f"{worker}-other"}
    other = backend.start(request(image, "sleep 300", tmp_path, labels=bystander))
    try:
        api = StubApi({})
        with docker_runner(backend, api, worker, base):
            until(lambda: not backend.find_leftovers(labels))
        assert not (base / "q-crash").exists()
        assert [handle.id for handle in backend.find_leftovers(bystander)] == [other.id]
    finally:
        backend.remove_leftovers(bystander)


def test_a_starting_runner_spares_another_stacks_job(
    backend: DockerBackend, image: str, tmp_path: Path, labels: dict[str, str]
) -> None:
    # Two stacks on one engine, whose runners have the same account name (as every
    # `labcloud up` names them): the second one's start-up cleanup must not touch the
    # job the first one is running, which then finishes normally.
    worker = labels[LABEL_WORKER]
    first_base, second_base = tmp_path / "stack-1" / "jobs", tmp_path / "stack-2" / "jobs"
    cmd = ["echo waiting;", "while [ ! -e /files/go ]; do sleep 0.1; done;", "echo done"]
    api = StubApi({"q-live": docker_job(image, cmd)})
    with docker_runner(backend, api, worker, first_base):
        until(lambda: "running" in api.statuses and backend.find_leftovers(labels))
        [live] = backend.find_leftovers(labels)
        other_api = StubApi({})
        with docker_runner(backend, other_api, worker, second_base):
            until(lambda: not other_api.queue)  # it pulled: its cleanup is over
        assert [handle.id for handle in backend.find_leftovers(labels)] == [live.id]
        assert backend.wait(live, timeout=0.1) is None, "the live job's container was stopped"
        (first_base / "q-live" / "files" / "go").touch()
        until(lambda: "finished" in api.statuses or "error" in api.statuses)
    assert api.statuses[-1] == "finished"
    assert api.uploads["log/log.txt"] == b"waiting\ndone\n"
    ids = {
        runner_identity(worker, DockerBackend(docker_settings(base), backend.client))
        for base in (first_base, second_base)
    }
    assert len(ids) == 2


class RecordingApi(StubApi):
    """A ``StubApi`` that also keeps the final status's runtime details."""

    def __init__(self, jobs: dict[str, dict[str, Any]]) -> None:
        super().__init__(jobs)
        self.details: list[str] = []

    def handler(self, req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/status") and "runtime_details" in req.url.params:
            self.details.append(req.url.params["runtime_details"])
        return super().handler(req)


def test_a_job_killed_from_outside_is_not_said_to_exceed_its_memory(
    backend: DockerBackend,
    engine: docker.DockerClient,
    image: str,
    tmp_path: Path,
    labels: dict[str, str],
) -> None:
    api = RecordingApi({"q-killed": docker_job(image, ["echo started;", "sleep 60"])})
    with docker_runner(backend, api, labels[LABEL_WORKER], tmp_path / "jobs"):
        until(lambda: "running" in api.statuses and backend.find_leftovers(labels))
        [container] = backend.find_leftovers(labels)
        engine.api.kill(container.id)  # what `docker kill` does
        until(lambda: "error" in api.statuses or "finished" in api.statuses)
    assert api.statuses[-1] == "error"
    [details] = api.details
    assert details.startswith(
        "killed from outside the runner: signal 9 sent through the container engine (exit code 137)"
    ), details
    assert "memory" not in details


def test_a_job_runs_as_its_user_on_a_read_only_root(
    backend: DockerBackend, image: str, tmp_path: Path, labels: dict[str, str]
) -> None:
    # The runner (root) gives the job folder to the job's user: the inputs are
    # readable and the results writable, /tmp is writable, / is not.
    cmd = [
        "id -u;",
        "cat /files/data/in.txt > /files/output/copy.txt &&",
        "touch /tmp/scratch && mkdir -p /files/output/sub && id -u > /files/output/sub/uid &&",
        "if touch /root-file; then exit 9; fi",
    ]
    container = {"user": "4321", "read_only_root": True, "pids_limit": 64}
    api = StubApi({"q-user": docker_job(image, cmd, container=container)})
    with docker_runner(backend, api, labels[LABEL_WORKER], tmp_path / "jobs"):
        until(lambda: "finished" in api.statuses or "error" in api.statuses)
    assert api.statuses[-1] == "finished"
    assert set(api.uploads) == {"output/copy.txt", "output/sub/uid", "log/log.txt"}
    assert not (tmp_path / "jobs" / "q-user").exists()
