"""``labcloud up --backend aws-batch``: the Batch resources it creates on the emulator
and what it refuses before anything starts (the whole stack running the demo job
through Batch is tests/e2e/test_aws_batch_stack.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labcloud_cli.stack import aws_batch
from labcloud_cli.stack.aws_emulator import Emulator
from labcloud_cli.stack.env_file import read_stack_env_file
from labcloud_cli.stack.processes import StartupError
from tests.aws import MotoServer
from tests.labcloud_cli.test_stack import _up


def test_provision_creates_the_compute_environment_and_queues(
    aws: MotoServer, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "left-over").write_text("a job folder of the previous emulator")
    created = aws_batch.provision_batch(Emulator(aws.endpoint_url, aws.region), shared)

    assert shared.is_dir() and not any(shared.iterdir())
    role = aws.client("iam").get_role(RoleName=aws_batch.SERVICE_ROLE_NAME)["Role"]
    assert role["Arn"] == created.service_role_arn
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "batch.amazonaws.com"}

    batch = aws.client("batch")
    [environment] = batch.describe_compute_environments()["computeEnvironments"]
    assert environment["computeEnvironmentArn"] == created.compute_environment_arn
    assert environment["type"] == "UNMANAGED"
    assert environment["state"] == "ENABLED"
    assert environment["serviceRole"] == created.service_role_arn
    queues = {queue["jobQueueName"]: queue for queue in batch.describe_job_queues()["jobQueues"]}
    assert set(queues) == {aws_batch.JOB_QUEUE_NAME, aws_batch.GPU_JOB_QUEUE_NAME}
    for queue in queues.values():
        assert queue["state"] == "ENABLED"
        assert [order["computeEnvironment"] for order in queue["computeEnvironmentOrder"]] == [
            created.compute_environment_arn
        ]

    assert created.runner_settings() == {
        "BACKEND": "aws-batch",
        "BATCH_JOB_QUEUE": aws_batch.JOB_QUEUE_NAME,
        "BATCH_GPU_JOB_QUEUE": aws_batch.GPU_JOB_QUEUE_NAME,
        "BATCH_SHARED_DIR": str(shared),
        "BATCH_EFS_FILE_SYSTEM_ID": "",
        "BATCH_MAX_IN_FLIGHT": str(aws_batch.MAX_IN_FLIGHT),
        "BATCH_OLDER_THAN": "0",
        "BATCH_POLL_INTERVAL": str(aws_batch.POLL_INTERVAL_S),
    }
    described = created.describe()
    for name in (created.compute_environment_arn, aws_batch.JOB_QUEUE_NAME, str(shared)):
        assert name in described


def test_provision_names_the_step_that_failed(aws: MotoServer, tmp_path: Path) -> None:
    emulator = Emulator(aws.endpoint_url, aws.region)
    aws_batch.provision_batch(emulator, tmp_path / "first")
    # The role exists now: a second provisioning on the same emulator is refused.
    with pytest.raises(StartupError, match="cannot create Batch's service role in IAM"):
        aws_batch.provision_batch(emulator, tmp_path / "second")


def test_env_file_cannot_choose_the_batch_resources(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    path.write_text("BACKEND=docker\nBATCH_SHARED_DIR=/elsewhere\nTIMEOUT_JOB=1\n")
    with pytest.raises(StartupError) as refused:
        read_stack_env_file(path, aws_emulator=True, aws_batch=True)
    assert "BACKEND: set by --backend aws-batch" in str(refused.value)
    assert "BATCH_SHARED_DIR: set by --backend aws-batch" in str(refused.value)
    assert "TIMEOUT_JOB" not in str(refused.value)

    path.write_text("BACKEND=AWS-Batch\n")
    with pytest.raises(StartupError, match="BACKEND: use --backend aws-batch"):
        read_stack_env_file(path, aws_emulator=False)


def test_up_refuses_batch_without_the_emulator(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = _up(data_dir, "--backend", "aws-batch")
    assert result.returncode == 1, result
    assert "--backend aws-batch runs jobs on the AWS emulator's Batch" in result.stderr
    assert "add --aws-emulator" in result.stderr
    assert not data_dir.exists()

    unknown = _up(data_dir, "--backend", "slurm")
    assert unknown.returncode == 2
    assert "invalid choice: 'slurm'" in unknown.stderr
