"""The AWS Batch backend's own logic against a stubbed Batch client (botocore's
``Stubber``, a fake standing in for throttling the emulator cannot produce):
submissions back off on throttling, polling asks about every run in calls of 100
job ids, and Batch's ends map to results."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber

from labcloud.contract import HardwareSpec
from worker_runner.backends.aws_batch import BatchBackend, BatchSettings
from worker_runner.backends.aws_batch import backend as batch_module
from worker_runner.backends.aws_batch.definitions import shared_volume
from worker_runner.backends.aws_batch.states import result_of
from worker_runner.backends.base import BackendError, Placement, RunHandle, RunRequest, RunResult
from worker_runner.backends.registry import BackendKind, load_backend_settings
from worker_runner.outcomes import failure_of

DEFINITION_ARN = "arn:aws:batch:us-east-1:123456789012:job-definition/labcloud-x:1"


@pytest.fixture
def batch() -> Iterator[Any]:
    client = boto3.client(
        "batch",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    yield client
    client.close()


@pytest.fixture
def backend(batch: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BatchBackend]:
    monkeypatch.setattr(batch_module, "SUBMIT_BACKOFF_S", 0.001)
    settings = BatchSettings(
        batch_job_queue="cpu", batch_shared_dir=tmp_path, batch_max_in_flight=3, _env_file=None
    )
    backend = BatchBackend(settings, batch, logs=None)
    yield backend
    backend.close()


def _request(tmp_path: Path) -> RunRequest:
    return RunRequest(
        image="lab/tool:1",
        command=("/bin/sh", "-c", "run"),
        folder=tmp_path / "q1" / "files",
        placement=Placement(memory=512, cpus=1, gpus=0),
    )


def _definition_found(stubber: Stubber) -> None:
    stubber.add_response(
        "describe_job_definitions",
        {
            "jobDefinitions": [
                {
                    "jobDefinitionName": "labcloud-x",
                    "jobDefinitionArn": DEFINITION_ARN,
                    "revision": 1,
                    "status": "ACTIVE",
                    "type": "container",
                }
            ]
        },
    )


def _throttled(stubber: Stubber, times: int) -> None:
    for _ in range(times):
        stubber.add_client_error(
            "submit_job",
            service_error_code="TooManyRequestsException",
            service_message="Too Many Requests",
            http_status_code=429,
        )


def test_a_throttled_submission_backs_off_and_goes_through(
    backend: BatchBackend, batch: Any, tmp_path: Path
) -> None:
    with Stubber(batch) as stubber:
        _definition_found(stubber)
        _throttled(stubber, 3)
        stubber.add_response("submit_job", {"jobName": "labcloud-q1", "jobId": "job-1"})
        handle = backend.start(_request(tmp_path))
        stubber.assert_no_pending_responses()
    assert handle.id == "job-1"


def test_a_submission_throttled_for_too_long_fails_the_start(
    backend: BatchBackend, batch: Any, tmp_path: Path
) -> None:
    with Stubber(batch) as stubber:
        _definition_found(stubber)
        _throttled(stubber, batch_module.SUBMIT_RETRIES + 1)
        with pytest.raises(BackendError, match="TooManyRequestsException"):
            backend.start(_request(tmp_path))
        stubber.assert_no_pending_responses()


def test_a_refused_submission_is_not_retried(
    backend: BatchBackend, batch: Any, tmp_path: Path
) -> None:
    with Stubber(batch) as stubber:
        _definition_found(stubber)
        stubber.add_client_error("submit_job", service_error_code="ClientException")
        with pytest.raises(BackendError, match="refused the job"):
            backend.start(_request(tmp_path))
        stubber.assert_no_pending_responses()


def test_polling_asks_about_all_runs_in_calls_of_a_hundred(
    backend: BatchBackend, batch: Any
) -> None:
    ids = [f"job-{i}" for i in range(250)]

    def described(chunk: list[str], status: str) -> dict[str, Any]:
        jobs = [
            {
                "jobName": f"labcloud-{i}",
                "jobId": i,
                "jobQueue": "cpu",
                "status": status,
                "startedAt": 1,
                "jobDefinition": DEFINITION_ARN,
                "container": {"exitCode": 0} if status == "SUCCEEDED" else {},
            }
            for i in chunk
        ]
        return {"jobs": jobs}

    with Stubber(batch) as stubber:
        for first, status in ((0, "RUNNING"), (100, "SUCCEEDED"), (200, "RUNNABLE")):
            chunk = ids[first : first + 100]
            stubber.add_response("describe_jobs", described(chunk, status), {"jobs": chunk})
        ended = backend.poll([RunHandle(id=i) for i in ids])
        stubber.assert_no_pending_responses()
    assert set(ended) == set(ids[100:200])
    assert all(result == RunResult(exit_code=0) for result in ended.values())


def test_a_throttled_poll_raises_for_the_poller_to_retry(backend: BatchBackend, batch: Any) -> None:
    with Stubber(batch) as stubber:
        stubber.add_client_error("describe_jobs", service_error_code="TooManyRequestsException")
        with pytest.raises(BackendError, match="DescribeJobs failed"):
            backend.poll([RunHandle(id="job-1")])


def test_a_job_that_finds_no_place_is_terminated_and_fails(
    backend: BatchBackend, batch: Any, tmp_path: Path
) -> None:
    with Stubber(batch) as stubber:
        _definition_found(stubber)
        stubber.add_response("submit_job", {"jobName": "labcloud-q1", "jobId": "job-1"})
        handle = backend.start(_request(tmp_path))
        runnable = {
            "jobName": "labcloud-q1",
            "jobId": "job-1",
            "jobQueue": "cpu",
            "status": "RUNNABLE",
            "startedAt": 0,
            "jobDefinition": DEFINITION_ARN,
        }
        stubber.add_response("describe_jobs", {"jobs": [runnable]}, {"jobs": ["job-1"]})
        assert backend.poll([handle]) == {}
        backend._runs["job-1"].submitted_at -= backend.settings.batch_max_queue_wait + 1
        stubber.add_response("describe_jobs", {"jobs": [runnable]}, {"jobs": ["job-1"]})
        stubber.add_response("terminate_job", {}, {"jobId": "job-1", "reason": ANY})
        result = backend.poll([handle])["job-1"]
        stubber.assert_no_pending_responses()
    assert isinstance(result, RunResult)
    failure = failure_of(result, 512)
    assert failure is not None and failure.kind == "system_error"
    assert "no place for the job in 3600 s (still RUNNABLE)" in failure.message
    assert backend.started(handle)  # over: the runner stops waiting for a start


def test_capacity_comes_from_settings(backend: BatchBackend) -> None:
    capacity = backend.capacity()
    assert capacity is not None
    assert capacity.query()["older_than"] == 600
    assert (capacity.limit, capacity.memory, capacity.cpu_cores) == (3, 262_144, 64)
    placements = [backend.reserve(HardwareSpec(memory=100)) for _ in range(3)]
    assert all(placements) and backend.capacity() is None
    assert backend.reserve(HardwareSpec()) is None
    backend.release(placements[0])  # type: ignore[arg-type]
    capacity = backend.capacity()
    assert capacity is not None and capacity.limit == 1
    assert backend.unfit_reason(HardwareSpec(cpu_cores=65)) is not None
    assert backend.unfit_reason(HardwareSpec(gpu_model="H100")) is not None


@pytest.mark.parametrize(
    ("job", "exit_code", "expected_kind", "expected_text"),
    [
        ({"status": "SUCCEEDED"}, None, None, None),
        ({"status": "FAILED"}, 3, "user_error", "exit code 3"),
        (
            {"status": "FAILED", "container": {"reason": "OutOfMemoryError: Container killed"}},
            137,
            "user_error",
            "memory limit exceeded",
        ),
        (
            {"status": "FAILED", "statusReason": "CannotPullContainerError: no such image"},
            None,
            "system_error",
            "CannotPullContainerError",
        ),
        (
            {"status": "FAILED", "statusReason": "Job attempt duration exceeded timeout"},
            None,
            "system_error",
            "exceeded timeout",
        ),
    ],
)
def test_batch_ends_map_to_failures(
    job: dict[str, Any], exit_code: int | None, expected_kind: str | None, expected_text: str | None
) -> None:
    failure = failure_of(result_of(job, exit_code, stopping=False), 512)
    if expected_kind is None:
        assert failure is None
    else:
        assert failure is not None and failure.kind == expected_kind
        assert expected_text is not None and expected_text in failure.message


def test_the_settings_are_read_by_their_fixed_names(tmp_path: Path) -> None:
    env_file = tmp_path / "runner.env"
    env_file.write_text(
        "BACKEND=aws-batch\nBATCH_JOB_QUEUE=cpu-queue\n"
        f"BATCH_SHARED_DIR={tmp_path / 'efs'}\nBATCH_EFS_FILE_SYSTEM_ID=fs-123\n"
        "BATCH_MAX_IN_FLIGHT=200\n"
    )
    settings = load_backend_settings(BackendKind.AWS_BATCH, env_file)
    assert isinstance(settings, BatchSettings)
    assert (settings.batch_job_queue, settings.gpu_job_queue) == ("cpu-queue", "cpu-queue")
    assert settings.batch_efs_file_system_id == "fs-123"
    assert settings.batch_max_in_flight == 200
    # The job folders are the shared folder's.
    assert settings.path_base == settings.batch_shared_dir == tmp_path / "efs"
    volume = shared_volume(settings)
    assert volume["efsVolumeConfiguration"] == {
        "fileSystemId": "fs-123",
        "rootDirectory": "/",
        "transitEncryption": "ENABLED",
    }
