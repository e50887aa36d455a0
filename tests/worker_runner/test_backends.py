"""The backend interface without an engine: capacity and placement of the Docker
and fake backends, their settings, the ``BACKEND`` setting and the registry, the
poller that follows many runs in one call, and the runner's identity."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from docker.types import DeviceRequest
from pydantic import ValidationError

from labcloud.contract import ContainerSpec, HardwareSpec
from tests.worker_runner.conftest import A10, API, AUTH, WORKER
from worker_runner.__main__ import main
from worker_runner.backends.base import (
    BackendError,
    Capacity,
    Placement,
    RunHandle,
    RunPoller,
    RunRequest,
    RunResult,
)
from worker_runner.backends.docker import DockerBackend, DockerSettings
from worker_runner.backends.fake import FakeBackend, FakeProgram, FakeSettings
from worker_runner.backends.registry import (
    BackendKind,
    create_backend,
    load_backend_settings,
)
from worker_runner.dispatcher import runner_identity
from worker_runner.hardware import HostHardware
from worker_runner.settings import WorkerSettings

# Every setting these tests read from env files, cleared from the environment.
SETTING_NAMES = (
    "API_URL",
    "AUTH_URL",
    "USERNAME",
    "PASSWORD",
    "TIMEOUT_JOB",
    "BACKEND",
    "PATH_BASE",
    "PATH_HOST_BASE",
    "SLOTS",
    "CPU_CORES",
    "MEMORY",
    "CONTAINER_NETWORK",
    "CONTAINER_PIDS_LIMIT",
    "FAKE_MEMORY",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)


def docker_backend(tmp_path: Path, hardware: HostHardware, **settings: object) -> DockerBackend:
    """A Docker backend that never talks to an engine (placement only)."""
    return DockerBackend(
        DockerSettings(path_base=tmp_path / "jobs", _env_file=None, **settings),  # type: ignore[arg-type]
        client=None,
        hardware=hardware,
    )


def test_docker_places_jobs_on_the_hosts_gpus(tmp_path: Path) -> None:
    backend = docker_backend(tmp_path, HostHardware(cpu_cores=4, memory=8192, gpus=A10), slots=2)
    assert backend.capacity() == Capacity(
        memory=8192,
        cpu_cores=4,
        gpus=2,
        gpu_mem=23028,
        gpu_model="NVIDIA A10",
        gpu_archi="8.6",
    )
    placement = backend.reserve(HardwareSpec(gpu_model="NVIDIA A10", memory=1000))
    assert placement is not None
    assert (placement.memory, placement.cpus, placement.gpus, placement.gpu_ids) == (
        1000,
        2.0,
        1,
        ("0",),
    )
    capacity = backend.capacity()
    assert capacity is not None and (capacity.memory, capacity.gpus) == (7192, 1)
    # The container is given the devices of its placement, and only those.
    request = RunRequest(image="img", command=("true",), folder=tmp_path, placement=placement)
    assert backend._create_options(request)["device_requests"] == [
        DeviceRequest(device_ids=["0"], capabilities=[["gpu"]])
    ]
    assert backend.reserve(HardwareSpec(gpus=2)) is None  # one GPU is free now
    assert backend.unfit_reason(HardwareSpec(gpus=3)) == (
        "the job needs 3 suitable GPU(s) but this worker has 2"
    )
    backend.release(placement)
    capacity = backend.capacity()
    assert capacity is not None and (capacity.memory, capacity.gpus) == (8192, 2)
    with pytest.raises(ValueError, match="already released"):
        backend.release(placement)
    with pytest.raises(ValueError, match="not a placement of this pool"):
        backend.release(Placement(memory=1))


def test_docker_is_full_when_its_slots_are(tmp_path: Path) -> None:
    backend = docker_backend(tmp_path, HostHardware(cpu_cores=2, memory=4096), slots=1)
    placement = backend.reserve(HardwareSpec())
    assert placement is not None and placement.gpu_ids == ()
    assert backend.capacity() is None
    assert backend.reserve(HardwareSpec()) is None
    assert backend.unfit_reason(HardwareSpec(gpu_mem=1)) == (
        "the job needs a GPU but this worker has none"
    )


def test_docker_options_come_from_its_settings(tmp_path: Path) -> None:
    backend = docker_backend(
        tmp_path,
        HostHardware(cpu_cores=2, memory=4096),
        path_host_base=Path("/srv/jobs"),
        container_network="bridge",
        container_pids_limit=300,
    )
    folder = tmp_path / "jobs" / "q1" / "files"
    options = backend._create_options(
        RunRequest(
            image="img",
            command=("true",),
            folder=folder,
            placement=Placement(memory=512, cpus=1.5),
        )
    )
    assert options["volumes"] == {"/srv/jobs/q1/files": {"bind": "/files", "mode": "rw"}}
    assert options["network_mode"] == "bridge"
    assert options["pids_limit"] == 300
    assert (options["mem_limit"], options["memswap_limit"]) == ("512m", "512m")
    spec = ContainerSpec(pids_limit=20, user="1000:1000", read_only_root=True)
    confined = backend._create_options(
        RunRequest(image="img", command=("true",), folder=folder, container=spec)
    )
    assert (confined["pids_limit"], confined["user"], confined["read_only"]) == (
        20,
        "1000:1000",
        True,
    )
    # A folder the engine cannot see through PATH_HOST_BASE is refused, not mounted.
    with pytest.raises(BackendError, match="not under PATH_BASE"):
        backend.host_path(tmp_path / "elsewhere")


def test_fake_places_jobs_like_a_host_of_its_settings(tmp_path: Path) -> None:
    settings = FakeSettings(
        path_base=tmp_path / "jobs", slots=2, fake_cpu_cores=4, fake_memory=8000, _env_file=None
    )
    backend = FakeBackend(settings)
    assert backend.job_root == tmp_path / "jobs"
    assert backend.capacity() == Capacity(memory=8000, cpu_cores=4)
    big = backend.reserve(HardwareSpec(memory=6000, cpu_cores=3))
    assert big is not None and (big.memory, big.cpus, big.gpu_ids) == (6000, 3.0, ())
    assert backend.capacity() == Capacity(memory=2000, cpu_cores=1)
    assert backend.reserve(HardwareSpec(memory=3000)) is None
    assert backend.unfit_reason(HardwareSpec(memory=3000)) is None  # it fits an idle host
    assert backend.unfit_reason(HardwareSpec(cpu_cores=5)) == (
        "the job needs 5 CPU cores but this worker has 4"
    )
    backend.release(big)
    assert backend.capacity() == Capacity(memory=8000, cpu_cores=4)


def test_settings_keep_their_environment_names(tmp_path: Path) -> None:
    env_file = tmp_path / "worker.env"
    env_file.write_text(
        "API_URL=http://api:8001/\nAUTH_URL=https://users.example\nUSERNAME=w\n"
        "PASSWORD=pw\nPATH_BASE=jobs\nPATH_HOST_BASE=/srv/jobs\nSLOTS=2\nCPU_CORES=3\n"
        "MEMORY=2048\nCONTAINER_NETWORK=bridge\nCONTAINER_PIDS_LIMIT=99\n"
    )
    settings = WorkerSettings(_env_file=env_file)
    assert settings.api_url == "http://api:8001"
    assert settings.backend is BackendKind.DOCKER
    assert settings.password.get_secret_value() == "pw"
    assert "pw" not in repr(settings)
    docker = load_backend_settings(settings.backend, env_file)
    assert isinstance(docker, DockerSettings)
    assert (docker.path_base, docker.host_base) == (tmp_path / "jobs", Path("/srv/jobs"))
    assert (docker.slots, docker.cpu_cores, docker.memory) == (2, 3, 2048)
    assert (docker.container_network, docker.container_pids_limit) == ("bridge", 99)
    # Without PATH_HOST_BASE the engine sees the runner's folders.
    env_file.write_text("PATH_BASE=jobs\n")
    assert load_backend_settings(BackendKind.DOCKER, env_file) == DockerSettings(
        path_base=tmp_path / "jobs", _env_file=None
    )
    env_file.write_text("PATH_HOST_BASE=relative\n")
    with pytest.raises(ValidationError, match="PATH_HOST_BASE must be an absolute path"):
        load_backend_settings(BackendKind.DOCKER, env_file)


def test_backend_setting_chooses_the_backend_and_its_settings(tmp_path: Path) -> None:
    env_file = tmp_path / "worker.env"
    env_file.write_text(
        "API_URL=http://api\nAUTH_URL=http://auth\nUSERNAME=w\nPASSWORD=pw\n"
        "BACKEND=FAKE\nFAKE_MEMORY=1234\nPATH_BASE=fake-jobs\n"
    )
    settings = WorkerSettings(_env_file=env_file)
    assert settings.backend is BackendKind.FAKE
    fake_settings = load_backend_settings(settings.backend, env_file)
    assert isinstance(fake_settings, FakeSettings) and fake_settings.fake_memory == 1234
    backend = create_backend(settings.backend, fake_settings)
    assert isinstance(backend, FakeBackend)
    assert backend.job_root == tmp_path / "fake-jobs"
    assert backend.capacity() == Capacity(memory=1234, cpu_cores=4)
    with pytest.raises(TypeError, match="the docker backend takes DockerSettings"):
        create_backend(BackendKind.DOCKER, fake_settings)


def test_an_unknown_backend_is_refused_naming_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env_file = tmp_path / "worker.env"
    env_file.write_text(
        "API_URL=http://api\nAUTH_URL=http://auth\nUSERNAME=w\nPASSWORD=pw\nBACKEND=batch\n"
    )
    assert main(["--env-file", str(env_file)]) == 2
    err = capsys.readouterr().err
    assert "BACKEND" in err and "'docker', 'aws-batch' or 'fake'" in err


def test_main_refuses_missing_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "worker.env"
    # AUTH_URL may be left out (a worker API using Cognito), not malformed.
    env_file.write_text("API_URL=ftp://nowhere\nAUTH_URL=nowhere\nTIMEOUT_JOB=soon\n")
    assert main(["--env-file", str(env_file)]) == 2
    err = capsys.readouterr().err
    for name in ("API_URL", "AUTH_URL", "USERNAME", "PASSWORD", "TIMEOUT_JOB"):
        assert name in err
    # The backend's settings are checked too, before anything starts.
    env_file.write_text(
        "API_URL=http://api\nAUTH_URL=http://auth\nUSERNAME=w\nPASSWORD=pw\nSLOTS=0\n"
    )
    assert main(["--env-file", str(env_file)]) == 2
    assert "SLOTS" in capsys.readouterr().err
    assert main(["--env-file", str(tmp_path / "missing.env")]) == 2
    assert "env file not found" in capsys.readouterr().err


def test_runner_identity_is_per_folder_and_account(tmp_path: Path) -> None:
    host = HostHardware(cpu_cores=1, memory=1024)

    def identity(username: str, path_base: Path, host_base: Path | None = None) -> str:
        backend = DockerBackend(
            DockerSettings(path_base=path_base, path_host_base=host_base, _env_file=None),
            hardware=host,
        )
        return runner_identity(username, backend)

    one = identity(WORKER, tmp_path / "stack-1" / "jobs")
    assert len(one) == 16 and int(one, 16) >= 0
    assert identity(WORKER, tmp_path / "stack-1" / "x" / ".." / "jobs") == one
    assert identity(WORKER, tmp_path / "stack-2" / "jobs") != one
    assert identity("worker-2", tmp_path / "stack-1" / "jobs") != one
    # Runners in containers: the same PATH_BASE inside, other folders on the host.
    inside = Path("/jobs")
    assert identity(WORKER, inside, Path("/srv/a")) != identity(WORKER, inside, Path("/srv/b"))
    # The same identity as before backends had settings of their own, so that an
    # upgraded runner still finds what it left behind.
    base = tmp_path / "stack-1" / "jobs"
    key = "\0".join((WORKER, str(base), str(base)))
    assert one == hashlib.sha256(key.encode()).hexdigest()[:16]
    assert API and AUTH  # the worker API plays no part in it


def test_one_poll_follows_every_run(tmp_path: Path) -> None:
    settings = FakeSettings(path_base=tmp_path, fake_poll_interval=0.01, _env_file=None)
    backend = FakeBackend(settings, default=FakeProgram(duration=0.3))
    folder = tmp_path / "files"
    handles = [
        backend.start(RunRequest(image=f"img-{n}", command=(), folder=folder)) for n in range(5)
    ]
    futures = [backend.follow(handle) for handle in handles]
    assert backend.follow(handles[0]) is futures[0]
    assert [future.result(timeout=5).exit_code for future in futures] == [0] * 5
    # Once all five were followed, one poll asked about all of them at once.
    assert max(backend.polls) == 5
    backend.close()


def test_the_poller_reports_lost_runs_and_closes() -> None:
    asked: list[list[str]] = []

    def poll(handles: Sequence[RunHandle]) -> dict[str, RunResult | BackendError]:
        asked.append([handle.id for handle in handles])
        return {"lost": BackendError("container lost is gone"), "done": RunResult(exit_code=4)}

    poller = RunPoller(poll, interval=0.01)
    lost, done, running = (poller.follow(RunHandle(id=name)) for name in ("lost", "done", "up"))
    assert done.result(timeout=5) == RunResult(exit_code=4)
    with pytest.raises(BackendError, match="container lost is gone"):
        lost.result(timeout=5)
    assert not running.done()
    poller.close()
    with pytest.raises(BackendError, match="closed before the run ended"):
        running.result(timeout=5)
    with pytest.raises(BackendError, match="closed"):
        poller.follow(RunHandle(id="late"))
    assert all(set(names) <= {"lost", "done", "up"} for names in asked)
