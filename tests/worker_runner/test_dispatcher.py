"""The dispatcher (``worker_runner.dispatcher``): pulls with the backend's capacity,
slots, placement, shutdown and hand-back, leftovers, the runner's identity."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from labcloud.contract import HardwareSpec
from tests.worker_runner.conftest import (
    A10,
    API,
    AUTH,
    WORKER,
    FakeWorkerApi,
    job_spec,
    run_one,
    running,
    wait_for,
)
from worker_runner.backends.base import Capacity, Placement
from worker_runner.backends.fake import FakeBackend, FakeProgram, FakeSettings
from worker_runner.client import WorkerApiClient
from worker_runner.dispatcher import Runner, RunnerAlreadyRunning, runner_identity
from worker_runner.job import LABEL_QUEUE_ID, LABEL_RUNNER, LABEL_WORKER
from worker_runner.settings import WorkerSettings
from worker_runner.staging import MARKER_NAME


def test_gpu_job_on_host_without_gpu(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    # Only a server that ignores the offer (gpus=0) sends such a job: it is refused
    # at once, before anything is staged or started.
    backend = FakeBackend(fake_settings)
    status, details = run_one(api, settings, client, backend, job_spec(hardware={"gpu_mem": 4000}))
    assert status == "error"
    assert details == "the job needs a GPU but this worker has none"
    assert backend.requests == []
    assert api.statuses_of("q1") == ["error"]
    assert api.outcome("q1") == {"failure": "system_error"}
    assert {p["gpus"] for p in api.pull_params} == {"0"}
    assert {p["gpu_mem"] for p in api.pull_params} == {"0"}


def test_gpu_job_gets_its_gpu(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    backend = FakeBackend(fake_settings, gpus=A10)
    status, _ = run_one(
        api, settings, client, backend, job_spec(hardware={"gpu_model": "NVIDIA A10"})
    )
    assert status == "finished"
    assert backend.requests[0].placement.gpu_ids == ("0",)
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
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    fake_settings.slots = 4
    api.match_hardware = True
    backend = FakeBackend(
        fake_settings,
        {"one": FakeProgram(duration=0.6), "two": FakeProgram(duration=0.1)},
        default=FakeProgram(duration=0.6),
        gpus=A10,
    )
    api.enqueue("g1", job_spec(job_id=1, image="one", hardware={"gpus": 1}))
    api.enqueue("g2", job_spec(job_id=2, image="one", hardware={"gpu_mem": 20000}))
    api.enqueue("g3", job_spec(job_id=3, image="two", hardware={"gpus": 2}))
    api.enqueue("c1", job_spec(job_id=4, image="cpu"))
    runner = Runner(settings, client, backend)
    with running(runner):
        wait_for(lambda: all(api.final(q) for q in ("g1", "g2", "g3", "c1")))
    assert {q: api.final(q) for q in ("g1", "g2", "g3", "c1")} == dict.fromkeys(
        ("g1", "g2", "g3", "c1"), ("finished", None)
    )
    gpus = {r.labels[LABEL_QUEUE_ID]: r.placement.gpu_ids for r in backend.requests}
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
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    api.enqueue("bad", {"app": {"cmd": "not a list"}})
    status, _ = run_one(
        api, settings, client, FakeBackend(fake_settings), job_spec(), queue_id="good"
    )
    assert status == "finished"
    final = api.final("bad")
    assert final is not None and final[0] == "error"
    assert final[1] is not None and final[1].startswith("invalid job spec")


def test_shutdown_hands_back_running_job(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
    tmp_path: Path,
) -> None:
    settings.shutdown_grace = 0.3
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=30))
    api.enqueue("q1", job_spec())
    runner = Runner(settings, client, backend)
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
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    settings.shutdown_grace = 5
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=0.5))
    api.enqueue("q1", job_spec())
    runner = Runner(settings, client, backend)
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
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    settings.shutdown_grace = 60
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=30))
    api.enqueue("q1", job_spec())
    runner = Runner(settings, client, backend)
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
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
    tmp_path: Path,
) -> None:
    backend = FakeBackend(fake_settings)
    mine = backend.add_leftover(
        {
            LABEL_WORKER: WORKER,
            LABEL_RUNNER: runner_identity(WORKER, backend),
            LABEL_QUEUE_ID: "old",
        }
    )
    theirs = backend.add_leftover({LABEL_WORKER: "worker-2", LABEL_RUNNER: "0123456789abcdef"})
    # Another stack's runner on the same engine, with the same account name.
    namesake = backend.add_leftover({LABEL_WORKER: WORKER, LABEL_RUNNER: "fedcba9876543210"})
    unlabelled = backend.add_leftover({LABEL_WORKER: WORKER})
    jobs = tmp_path / "jobs"
    (jobs / "old" / "files").mkdir(parents=True)
    (jobs / "old" / MARKER_NAME).write_text(runner_identity(WORKER, backend))
    (jobs / "other").mkdir()
    (jobs / "other" / MARKER_NAME).write_text("0123456789abcdef")
    (jobs / "by-name").mkdir()
    (jobs / "by-name" / MARKER_NAME).write_text(WORKER)
    (jobs / "unrelated").mkdir()

    runner = Runner(settings, client, backend)
    with running(runner):
        wait_for(lambda: mine.id in backend.removed)
    assert not {theirs.id, namesake.id, unlabelled.id} & set(backend.removed)
    assert not (jobs / "old").exists()
    for kept in ("other", "by-name", "unrelated"):
        assert (jobs / kept).is_dir()


def test_a_second_runner_of_the_same_identity_refuses_to_start(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    # It would remove the first one's containers and job folders as its leftovers.
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=30))
    api.enqueue("q1", job_spec())
    with running(Runner(settings, client, backend)):
        wait_for(lambda: backend.running())
        second = Runner(settings, client, backend)
        with pytest.raises(RunnerAlreadyRunning, match="another runner of worker-1 uses"):
            second.run(threading.Event())
        assert backend.running() and not backend.removed
    # Once the first one stopped, a runner of that identity starts again.
    with running(Runner(settings, client, backend)):
        pass


def test_slots_run_jobs_in_parallel(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    fake_settings.slots = 2
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=1.0))
    api.enqueue("q1", job_spec(job_id=1))
    api.enqueue("q2", job_spec(job_id=2))
    runner = Runner(settings, client, backend)
    started = time.monotonic()
    with running(runner):
        wait_for(lambda: api.final("q1") and api.final("q2"))
    assert time.monotonic() - started < 1.8
    # A job that names no need gets half of the host; the second pull offered what
    # the first job left.
    assert [(r.placement.memory, r.placement.cpus) for r in backend.requests] == [
        (4096, 2.0),
        (4096, 2.0),
    ]
    assert (api.pull_params[0]["memory"], api.pull_params[1]["memory"]) == ("8192", "4096")


def test_jobs_run_together_only_when_they_fit(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    fake_settings.slots = 4
    api.match_hardware = True
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=0.5))
    api.enqueue("big", job_spec(job_id=1, hardware={"memory": 6000, "cpu_cores": 3}))
    api.enqueue("also-big", job_spec(job_id=2, hardware={"memory": 4000}))
    api.enqueue("light", job_spec(job_id=3))
    runner = Runner(settings, client, backend)
    with running(runner):
        wait_for(lambda: all(api.final(q) for q in ("big", "also-big", "light")))
    # The light job fits beside the big one, in what memory is left; the second
    # big job waits until the first one ended and gave its memory back.
    assert api.leased == ["big", "light", "also-big"]
    [light] = [r for r in backend.requests if r.labels[LABEL_QUEUE_ID] == "light"]
    assert (light.placement.memory, light.placement.cpus) == (
        8192 // 4,
        1.0,
    )  # an even share, less than was left
    assert api.pull_params[1]["memory"] == str(8192 - 6000)
    assert api.pull_params[1]["cpu_cores"] == "1"
    with api.lock:
        sequence = [(q, status) for q, status, _ in api.statuses]
    assert sequence.index(("big", "finished")) < sequence.index(("also-big", "running"))


def test_long_poll_repolls_at_once_and_sleeps_when_ignored(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    # A server that honours wait: the runner polls again without sleeping.
    settings.wait = 0.1
    settings.timeout_job = 30
    api.hold_empty_pull = 0.1
    runner = Runner(settings, client, FakeBackend(fake_settings))
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
        runner = Runner(settings, quick_client, FakeBackend(fake_settings))
        with running(runner):
            time.sleep(0.5)
    assert 1 <= len(quick.pull_params) <= 2


class CloudLikeBackend(FakeBackend):
    """A backend that places jobs elsewhere, as a cloud scheduler does: no local
    GPUs to pick, every job up to a per-job size, as many in flight as slots."""

    def __init__(self, settings: FakeSettings, program: FakeProgram) -> None:
        super().__init__(settings, default=program)
        self.in_flight = 0
        self._count_lock = threading.Lock()

    def capacity(self) -> Capacity | None:
        with self._count_lock:
            free = self.settings.slots - self.in_flight
        if free < 1:
            return None
        return Capacity(memory=self.settings.fake_memory, cpu_cores=4, limit=free)

    def reserve(self, needs: HardwareSpec) -> Placement | None:
        with self._count_lock:
            if self.in_flight >= self.settings.slots:
                return None
            self.in_flight += 1
        return Placement(memory=needs.memory or 1024, cpus=float(needs.cpu_cores or 1))

    def release(self, placement: Placement) -> None:
        with self._count_lock:
            self.in_flight -= 1


def test_a_backend_with_room_for_many_leases_many_in_one_pull(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    fake_settings.slots = 3
    backend = CloudLikeBackend(fake_settings, FakeProgram(duration=0.5))
    for n in range(4):
        api.enqueue(f"q{n}", job_spec(job_id=n))
    with running(Runner(settings, client, backend)):
        wait_for(lambda: all(api.final(f"q{n}") for n in range(4)))
    assert api.pull_params[0]["limit"] == "3"
    assert api.leased[:3] == ["q0", "q1", "q2"]
    # The three ran together and were followed by the same polls.
    assert max(backend.polls) == 3
    assert {api.final(f"q{n}") for n in range(4)} == {("finished", None)}
