"""``labcloud up --aws-emulator --backend aws-batch`` as a newcomer runs it: the
console script starts moto's server with Batch's compute environment and job queues,
the stack's runner runs with ``BACKEND=aws-batch`` as a cloud worker, and the
README's example session runs the demo tool through Batch: a real container on the
local Docker engine, started by moto, its ``/files`` the job's folder in the shared
folder that stands in for EFS.

One stack for the module: the start message, the example session (the demo job
finished through Batch, the Batch job in the emulator with LabCloud's tags, the
result downloaded), then the runner's account and settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from labcloud_cli.images import DEMO_IMAGE
from labcloud_cli.stack import aws_batch
from labcloud_cli.stack.setup import read_env_file
from tests.e2e.aws_stack import EmulatedStack, emulated_stack
from tests.e2e.test_aws_emulator import _bash
from tests.waiting import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedStack]:
    # The runner's poll settings make the test quicker.
    root = tmp_path_factory.mktemp("aws-batch")
    with emulated_stack(root, "TIMEOUT_JOB=1\nWAIT=2\n", "--backend", "aws-batch") as stack:
        yield stack


def _shared_dir(stack: EmulatedStack) -> Path:
    return stack.data_dir / "aws-emulator" / aws_batch.SHARED_FOLDER


def test_start_message_names_the_batch_resources(stack: EmulatedStack) -> None:
    text = stack.text()
    batch = stack.client("batch")
    [environment] = batch.describe_compute_environments()["computeEnvironments"]
    assert environment["type"] == "UNMANAGED" and environment["state"] == "ENABLED"
    assert environment["computeEnvironmentArn"] in text
    assert environment["serviceRole"] in text
    queues = {queue["jobQueueName"] for queue in batch.describe_job_queues()["jobQueues"]}
    assert queues == {aws_batch.JOB_QUEUE_NAME, aws_batch.GPU_JOB_QUEUE_NAME}
    assert f"{aws_batch.JOB_QUEUE_NAME} (BATCH_JOB_QUEUE)" in text
    assert f"{aws_batch.GPU_JOB_QUEUE_NAME} (BATCH_GPU_JOB_QUEUE)" in text
    assert f"{_shared_dir(stack)} (BATCH_SHARED_DIR" in text
    assert "BACKEND=aws-batch, cloud workers" in text


def test_the_example_session_runs_the_demo_job_through_batch(
    stack: EmulatedStack, tmp_path: Path
) -> None:
    lines = stack.example_session()
    body_end = next(i for i, line in enumerate(lines) if line.endswith("}}}'"))
    setup = lines[: body_end + 1]
    printed = _bash([*setup, 'echo "TOKEN=$TOKEN"'], tmp_path)
    token = printed.rsplit("TOKEN=", 1)[1].strip()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=stack.user_url, headers=headers, timeout=30) as client:
        [job] = client.get("/jobs").json()
        assert job["job_name"] == "count-1", job

        def finished() -> dict[str, Any] | None:
            current: dict[str, Any] = client.get(f"/jobs/{job['id']}").json()
            assert current["status"] != "error", current
            return current if current["status"] == "finished" else None

        done = wait_for(finished, timeout=240, interval=0.5, what="the demo job to finish")
    download = next(line for line in lines if "/download" in line)
    login = [line for line in setup if line.startswith(("API=", "TOKEN=", "AUTH="))]
    assert _bash([*login, download], tmp_path) == "fox.txt 4\n"

    # The job ran through the emulator's Batch: one job, succeeded, on the CPU queue,
    # tagged with the LabCloud job and the runner's account.
    batch = stack.client("batch")
    [summary] = batch.list_jobs(jobQueue=aws_batch.JOB_QUEUE_NAME, jobStatus="SUCCEEDED")[
        "jobSummaryList"
    ]
    [described] = batch.describe_jobs(jobs=[summary["jobId"]])["jobs"]
    runner = read_env_file(stack.data_dir / "runners" / "runner-1.env")
    assert described["tags"]["labcloud.job_id"] == str(job["id"]), described["tags"]
    assert described["tags"]["labcloud.worker"] == runner["USERNAME"], described["tags"]
    for status in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "FAILED"):
        for queue in (aws_batch.JOB_QUEUE_NAME, aws_batch.GPU_JOB_QUEUE_NAME):
            assert not batch.list_jobs(jobQueue=queue, jobStatus=status)["jobSummaryList"]
    # Its job definition runs the demo image with the catalog's resources and mounts
    # the shared folder as a host path (no EFS on the emulator).
    [definition] = batch.describe_job_definitions(jobDefinitions=[described["jobDefinition"]])[
        "jobDefinitions"
    ]
    container = definition["containerProperties"]
    assert container["image"] == DEMO_IMAGE
    requirements = {item["type"]: item["value"] for item in container["resourceRequirements"]}
    assert requirements == {"VCPU": "1", "MEMORY": "256"}
    assert [volume["host"]["sourcePath"] for volume in container["volumes"]] == [
        str(_shared_dir(stack))
    ]
    # The command makes /files the job's folder, then runs the catalog's command.
    command = described["container"]["command"]
    assert command[0] == "/bin/sh" and command[-1] == "/app/wordcount.sh", command
    # The job shows where it ran.
    outcome = done["outcome"]
    assert outcome["backend"] == "aws-batch", outcome
    assert outcome["run_id"] == summary["jobId"], outcome
    assert outcome["runner"], outcome


def test_the_runners_are_cloud_workers(stack: EmulatedStack) -> None:
    access = httpx.get(f"{stack.user_url}/access_info").json()["cognito"]
    idp = stack.client("cognito-idp")

    def groups(email: str) -> set[str]:
        answer = idp.admin_list_groups_for_user(UserPoolId=access["user_pool_id"], Username=email)
        return {group["GroupName"] for group in answer["Groups"]}

    runner = read_env_file(stack.data_dir / "runners" / "runner-1.env")
    assert groups(runner["USERNAME"]) == {"workers", "cloud"}
    assert runner["BACKEND"] == "aws-batch"
    assert runner["BATCH_JOB_QUEUE"] == aws_batch.JOB_QUEUE_NAME
    assert runner["BATCH_GPU_JOB_QUEUE"] == aws_batch.GPU_JOB_QUEUE_NAME
    assert runner["BATCH_SHARED_DIR"] == str(_shared_dir(stack))
    assert runner["BATCH_EFS_FILE_SYSTEM_ID"] == ""
    # worker.env is for one more runner on a GPU host: a local Docker runner.
    other = read_env_file(stack.data_dir / "worker.env")
    assert "BACKEND" not in other and "BATCH_JOB_QUEUE" not in other
    assert groups(other["USERNAME"]) == {"workers"}
