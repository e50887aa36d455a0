"""The AWS Batch backend on moto's Batch, which runs each job as a real container
on the local Docker engine (its host-path volume stands in for EFS), with the
runner against the fake worker API."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.aws import MotoServer
from tests.batch import BatchQueues, batch_image, batch_queues, slow_transitions
from tests.worker_runner.conftest import FakeWorkerApi, job_spec, running
from worker_runner.backends.aws_batch import BatchBackend, BatchSettings
from worker_runner.backends.aws_batch.backend import LEFTOVER_REASON, TERMINATE_REASON
from worker_runner.backends.base import Placement, RunRequest
from worker_runner.backends.registry import BackendKind
from worker_runner.client import WorkerApiClient
from worker_runner.dispatcher import Runner, runner_identity
from worker_runner.job import LABEL_RUNNER, LABEL_WORKER
from worker_runner.settings import WorkerSettings

# tests/conftest.py: Docker must answer (moto's Batch runs containers on it).
pytestmark = pytest.mark.docker

POLL_S = 0.3


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    engine = docker.from_env()
    try:
        yield batch_image(engine, tmp_path_factory.mktemp("image"))
    finally:
        engine.close()


@pytest.fixture
def queues(aws: MotoServer) -> BatchQueues:
    return batch_queues(aws)


def batch_settings(shared: Path, queues: BatchQueues, **extra: Any) -> BatchSettings:
    return BatchSettings(
        batch_job_queue=queues.cpu,
        batch_gpu_job_queue=queues.gpu,
        batch_shared_dir=shared,
        batch_poll_interval=POLL_S,
        _env_file=None,
        **extra,
    )


@pytest.fixture
def backend(queues: BatchQueues, tmp_path: Path) -> Iterator[BatchBackend]:
    backend = BatchBackend.from_settings(batch_settings(tmp_path / "shared", queues))
    yield backend
    backend.close()


@pytest.fixture
def batch_runner_settings(settings: WorkerSettings) -> WorkerSettings:
    return settings.model_copy(update={"backend": BackendKind.AWS_BATCH})


def until(condition: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def batch_job(aws: MotoServer, job_id: str) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = aws.client("batch").describe_jobs(jobs=[job_id])["jobs"]
    return jobs[0]


def containers_of(job_id: str) -> list[str]:
    """Running containers of a Batch job (moto names them ``<job name>-<job id>``)."""
    engine = docker.from_env()
    try:
        return [c.name or "" for c in engine.containers.list(filters={"name": job_id})]
    finally:
        engine.close()


def tool_job(image: str, script: str, **extra: Any) -> dict[str, Any]:
    return job_spec(image=image, cmd=[script], hardware={"memory": 64, "cpu_cores": 1}, **extra)


def test_a_job_runs_through_batch_to_finished(
    aws: MotoServer,
    api: FakeWorkerApi,
    client: WorkerApiClient,
    batch_runner_settings: WorkerSettings,
    backend: BatchBackend,
    image: str,
    tmp_path: Path,
) -> None:
    api.inputs["u/in.txt"] = b"payload\n"
    script = (
        "mkdir -p /files/output && cat /files/data/in.txt | tee /files/output/copy.txt; "
        'echo "mode $MODE"'
    )
    api.enqueue("q1", tool_job(image, script, files_down={"data/in.txt": "u/in.txt"}, timeout=30))
    runner = Runner(batch_runner_settings, client, backend)
    with running(runner):
        until(lambda: api.final("q1") is not None)
    assert api.final("q1") == ("finished", None)
    uploads = api.uploads_of("q1")
    assert uploads[("output", "copy.txt")] == b"payload\n"
    assert uploads[("log", "log.txt")] == b"payload\nmode fast\n"
    # A cloud runner takes jobs for any environment only once they are old enough.
    assert api.pull_params[0]["older_than"] == "600"
    outcome = api.outcome("q1")
    assert outcome is not None
    assert (outcome["exit_code"], outcome["runner"], outcome["backend"]) == (
        0,
        "worker-1",
        "aws-batch",
    )
    job = batch_job(aws, outcome["run_id"])
    assert job["status"] == "SUCCEEDED"
    assert job["jobQueue"].endswith("/labcloud-cpu")
    assert job["tags"][LABEL_RUNNER] == runner.runner_id
    assert job["tags"]["labcloud.queue_id"] == "q1"
    # Batch's limit is a backstop after the runner's own (30 s, + 30 s to stop it,
    # + two polls).
    assert job["timeout"] == {"attemptDurationSeconds": 61}
    assert not (tmp_path / "shared" / "q1").exists()


def test_a_job_waiting_in_batch_s_queue_is_not_yet_running(
    aws: MotoServer,
    api: FakeWorkerApi,
    client: WorkerApiClient,
    batch_runner_settings: WorkerSettings,
    backend: BatchBackend,
    queues: BatchQueues,
    image: str,
) -> None:
    slow_transitions(aws, 1.5)
    api.enqueue("q1", tool_job(image, "echo quick", timeout=2))
    waiting: list[list[str]] = []
    with running(Runner(batch_runner_settings, client, backend)):
        until(lambda: aws.client("batch").list_jobs(jobQueue=queues.cpu)["jobSummaryList"])
        job_id = aws.client("batch").list_jobs(jobQueue=queues.cpu)["jobSummaryList"][0]["jobId"]
        while batch_job(aws, job_id)["status"] in ("SUBMITTED", "PENDING", "RUNNABLE"):
            waiting.append(api.statuses_of("q1"))
            time.sleep(0.2)
        until(lambda: api.final("q1") is not None)
    assert waiting and all(seen == ["preprocessing"] for seen in waiting)
    assert api.statuses_of("q1") == ["preprocessing", "running", "postprocessing", "finished"]
    # Its 2 s time limit counted from RUNNING, not from the ~5 s in the queue.
    assert api.final("q1") == ("finished", None)


def test_a_failing_tool_ends_in_error_with_its_log(
    api: FakeWorkerApi,
    client: WorkerApiClient,
    batch_runner_settings: WorkerSettings,
    backend: BatchBackend,
    image: str,
) -> None:
    api.enqueue("q1", tool_job(image, "echo broken-tool >&2; exit 3"))
    with running(Runner(batch_runner_settings, client, backend)):
        until(lambda: api.final("q1") is not None)
    final = api.final("q1")
    assert final is not None and final[0] == "error"
    assert final[1] is not None and final[1].startswith("exit code 3")
    assert "broken-tool" in final[1]
    outcome = api.outcome("q1")
    assert outcome is not None
    assert (outcome["exit_code"], outcome["failure"]) == (3, "user_error")
    assert api.uploads_of("q1")[("log", "log.txt")] == b"broken-tool\n"


def _running_job(aws: MotoServer, queue: str) -> str:
    jobs = aws.client("batch").list_jobs(jobQueue=queue, jobStatus="RUNNING")["jobSummaryList"]
    return str(jobs[0]["jobId"]) if jobs and containers_of(jobs[0]["jobId"]) else ""


def test_a_cancelled_job_s_container_is_stopped(
    aws: MotoServer,
    api: FakeWorkerApi,
    client: WorkerApiClient,
    batch_runner_settings: WorkerSettings,
    backend: BatchBackend,
    queues: BatchQueues,
    image: str,
) -> None:
    api.enqueue("q1", tool_job(image, "echo started; sleep 120"))
    with running(Runner(batch_runner_settings, client, backend)):
        until(lambda: _running_job(aws, queues.cpu))
        job_id = _running_job(aws, queues.cpu)
        cancelled_at = time.monotonic()
        with api.lock:
            api.gone.add("q1")
        until(lambda: not containers_of(job_id), timeout=15)
        stopped_after = time.monotonic() - cancelled_at
        until(lambda: batch_job(aws, job_id)["status"] == "FAILED", timeout=15)
    # A keep-alive (every 0.05 s) learns of the cancellation, then the
    # container is gone within moto's half-second watch.
    assert stopped_after < 5
    assert batch_job(aws, job_id)["statusReason"] == TERMINATE_REASON
    assert api.final("q1") is None  # a cancelled job is not reported


def test_a_timeout_stops_the_batch_job(
    aws: MotoServer,
    api: FakeWorkerApi,
    client: WorkerApiClient,
    batch_runner_settings: WorkerSettings,
    backend: BatchBackend,
    image: str,
) -> None:
    api.enqueue("q1", tool_job(image, "echo begun; sleep 120", timeout=3))
    with running(Runner(batch_runner_settings, client, backend)):
        until(lambda: api.final("q1") is not None)
    final = api.final("q1")
    assert final is not None and final[0] == "error"
    assert final[1] is not None and final[1].startswith("timed out after 3 s")
    outcome = api.outcome("q1")
    assert outcome is not None and outcome["failure"] == "timed_out"
    job = batch_job(aws, outcome["run_id"])
    # Batch's minimum.
    assert job["timeout"] == {"attemptDurationSeconds": 60}
    until(lambda: batch_job(aws, outcome["run_id"])["status"] == "FAILED", timeout=15)
    assert not containers_of(outcome["run_id"])


def test_a_restarted_runner_terminates_what_its_previous_life_left(
    aws: MotoServer,
    api: FakeWorkerApi,
    client: WorkerApiClient,
    batch_runner_settings: WorkerSettings,
    queues: BatchQueues,
    image: str,
    tmp_path: Path,
) -> None:
    """The runner dies while its Batch job runs; the worker API re-queues the job
    once its lease runs out, so the restarted runner, which holds no job, terminates
    the old Batch job rather than adopt it (the lease is not its to take back).
    Another runner's job on the same queue is spared."""
    settings = batch_settings(tmp_path / "shared", queues)
    first_life = BatchBackend.from_settings(settings)
    runner_id = runner_identity(batch_runner_settings.worker_name, first_life)
    folder = tmp_path / "shared" / "q-old" / "files"
    folder.mkdir(parents=True)

    def start(labels: dict[str, str]) -> str:
        request = RunRequest(
            image=image, command=("sleep", "120"), folder=folder, labels=labels, timeout=600
        )
        return first_life.start(request).id

    ours = start({LABEL_WORKER: "worker-1", LABEL_RUNNER: runner_id})
    others = start({LABEL_WORKER: "worker-1", LABEL_RUNNER: "another-runner"})
    until(lambda: containers_of(ours) and containers_of(others))
    first_life.close()  # killed: nothing removed

    second_life = BatchBackend.from_settings(settings)
    try:
        runner = Runner(batch_runner_settings, client, second_life)
        assert runner.runner_id == runner_id
        with running(runner):
            until(lambda: not containers_of(ours), timeout=20)
        assert batch_job(aws, ours)["statusReason"] == LEFTOVER_REASON
        assert batch_job(aws, others)["status"] == "RUNNING"
    finally:
        aws.client("batch").terminate_job(jobId=others, reason="test over")
        until(lambda: not containers_of(others), timeout=20)
        second_life.close()


def test_many_jobs_in_flight_are_followed_with_one_describe_jobs_per_poll(
    api: FakeWorkerApi,
    client: WorkerApiClient,
    batch_runner_settings: WorkerSettings,
    backend: BatchBackend,
    image: str,
) -> None:
    count = 8
    described: list[int] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        described.append(len(params["jobs"]))

    backend._batch.meta.events.register("before-parameter-build.batch.DescribeJobs", record)
    for index in range(count):
        script = f"sleep 3; mkdir -p /files/output; echo {index} > /files/output/n.txt"
        api.enqueue(f"q{index}", tool_job(image, script, timeout=60))
    began = time.monotonic()
    with running(Runner(batch_runner_settings, client, backend)):
        until(lambda: all(api.final(f"q{i}") is not None for i in range(count)), timeout=120)
        elapsed = time.monotonic() - began
    for index in range(count):
        assert api.final(f"q{index}") == ("finished", None)
        assert api.uploads_of(f"q{index}")[("output", "n.txt")] == f"{index}\n".encode()
    # All of them in one call, and one call per poll interval: not one per job.
    assert max(described) == count
    assert len(described) <= elapsed / POLL_S + 2


def test_a_gpu_job_is_submitted_with_its_gpus_to_the_gpu_queue(
    aws: MotoServer,
    backend: BatchBackend,
    queues: BatchQueues,
    image: str,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "shared" / "q-gpu" / "files"
    folder.mkdir(parents=True)
    request = RunRequest(
        image=image,
        command=("echo", "on a GPU"),
        folder=folder,
        placement=Placement(memory=2048, cpus=1.5, gpus=1),
    )
    handle = backend.start(request)
    assert backend.follow(handle).result(timeout=60).exit_code == 0
    job = batch_job(aws, handle.id)
    assert job["jobQueue"].endswith(f"/{queues.gpu}")
    batch = aws.client("batch")
    definition = batch.describe_job_definitions(jobDefinitions=[job["jobDefinition"]])
    properties = definition["jobDefinitions"][0]["containerProperties"]
    # The emulator ignores GPUs: the request is what is checked.
    assert sorted((r["type"], r["value"]) for r in properties["resourceRequirements"]) == [
        ("GPU", "1"),
        ("MEMORY", "2048"),
        ("VCPU", "2"),
    ]
    assert properties["mountPoints"][0]["containerPath"] == "/mnt/labcloud"
    assert properties["volumes"][0]["host"]["sourcePath"] == str(tmp_path / "shared")

    # The same shape reuses the definition, also after a restart (found by name).
    backend.start(request)
    restarted = BatchBackend.from_settings(backend.settings)
    try:
        again = restarted.start(request)
        assert batch_job(aws, again.id)["jobDefinition"] == job["jobDefinition"]
    finally:
        restarted.close()
    active = batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"]
    assert len(active) == 1
