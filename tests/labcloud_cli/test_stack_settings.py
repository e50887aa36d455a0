"""``labcloud up --env-file`` and ``--aws-emulator``: what is refused before anything
starts, and ``labcloud runner`` handing a settings file's AWS variables to boto3."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

from labcloud_cli.stack.env_file import read_stack_env_file
from labcloud_cli.stack.processes import StartupError
from tests.aws import MotoServer
from tests.e2e.stack import free_port
from tests.labcloud_cli.test_stack import LABCLOUD, _env, _up
from tests.waiting import wait_for

SECRET_VALUE = "do-not-print-me-7f3a"


def test_env_file_values_in_the_format_of_env(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    path.write_text(
        "# a comment\n"
        "DATABASE_URL='postgresql://labcloud:{}@127.0.0.1/labcloud'\n"
        "signup_requires_approval=true   # lower case is the same setting\n"
        'export BACKEND="fake"\n'
        "AWS_MAX_ATTEMPTS=3\n"
        "FAKE_CPU_CORES=2\n"
    )
    assert read_stack_env_file(path, aws_emulator=False) == {
        "DATABASE_URL": "postgresql://labcloud:{}@127.0.0.1/labcloud",
        "SIGNUP_REQUIRES_APPROVAL": "true",
        "BACKEND": "fake",
        "AWS_MAX_ATTEMPTS": "3",
        "FAKE_CPU_CORES": "2",
    }


def test_env_file_names_every_refused_setting_and_no_value(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    path.write_text(
        f"DATABSE_URL={SECRET_VALUE}\n"  # a typo
        f"PUBLIC_URL=http://{SECRET_VALUE}\n"
        "USERNAME=someone\n"
        "AUTH=cognito\n"
        "LONELY\n"
    )
    with pytest.raises(StartupError) as plain:
        read_stack_env_file(path, aws_emulator=False)
    message = str(plain.value)
    assert "DATABSE_URL: not a setting of the user API, the worker API or a runner" in message
    assert "PUBLIC_URL: set by labcloud up; use --advertise-address" in message
    assert "USERNAME: set by labcloud up" in message
    assert "LONELY: no value" in message
    assert "AUTH" not in message  # a setting like any other without the emulator
    assert SECRET_VALUE not in message
    with pytest.raises(StartupError, match="AUTH: set by --aws-emulator"):
        read_stack_env_file(path, aws_emulator=True)


def test_up_refuses_a_bad_env_file_before_starting_anything(tmp_path: Path) -> None:
    env_file = tmp_path / "stack.env"
    env_file.write_text(f"INTERNAL_API_KEY_SECRET={SECRET_VALUE}\nFILESYSTEM=local\n")
    data_dir = tmp_path / "data"
    result = _up(data_dir, "--aws-emulator", "--env-file", str(env_file))
    assert result.returncode == 1, result
    assert "INTERNAL_API_KEY_SECRET: set by --aws-emulator" in result.stderr
    assert "FILESYSTEM: set by --aws-emulator" in result.stderr
    assert SECRET_VALUE not in result.stdout + result.stderr
    assert not data_dir.exists()

    missing = _up(data_dir, "--env-file", str(tmp_path / "nowhere.env"))
    assert missing.returncode == 1
    assert "nowhere.env: no such file" in missing.stderr


def test_up_refuses_two_catalogs(tmp_path: Path) -> None:
    env_file = tmp_path / "stack.env"
    env_file.write_text("APPLICATION_CONFIG_FILE=s3://bucket/catalog.yaml\n")
    result = _up(tmp_path / "d", "--env-file", str(env_file), "--catalog", str(env_file))
    assert result.returncode == 1
    assert "either with --catalog or in --env-file" in result.stderr


def test_up_names_the_emulator_port_when_it_is_taken(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = _up(
            tmp_path / "d",
            "--aws-emulator",
            "--aws-emulator-port",
            str(port),
            "--user-port",
            str(free_port()),
            "--worker-port",
            str(free_port()),
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is not free" in result.stderr
    assert "--aws-emulator-port" in result.stderr
    assert not (tmp_path / "d").exists()


def test_labcloud_runner_gives_the_files_aws_variables_to_boto3(
    tmp_path: Path, moto_server: MotoServer
) -> None:
    # The runner's PASSWORD is an ARN: it starts only if the file's AWS_* lines
    # reached boto3 (the test's own environment has none of them).
    moto_server.reset()
    arn = moto_server.client("secretsmanager").create_secret(
        Name="labcloud/runner-test", SecretString="correct-horse-1"
    )["ARN"]
    closed = free_port()
    env_file = tmp_path / "worker.env"
    env_file.write_text(
        f"API_URL=http://127.0.0.1:{closed}\n"
        f"AUTH_URL=http://127.0.0.1:{closed}\n"
        "USERNAME=runner@example.org\n"
        f"PASSWORD={arn}\n"
        f"PATH_BASE={tmp_path / 'jobs'}\n"
        "BACKEND=fake\n"
        f"AWS_ENDPOINT_URL={moto_server.endpoint_url}\n"
        "AWS_ACCESS_KEY_ID=testing\n"
        "AWS_SECRET_ACCESS_KEY=testing\n"
        f"AWS_DEFAULT_REGION={moto_server.region}\n"
    )
    environment = {k: v for k, v in _env().items() if not k.startswith("AWS_")}
    log_path = tmp_path / "runner.log"
    with log_path.open("wb") as log:
        runner = subprocess.Popen(
            [str(LABCLOUD), "runner", "--env-file", str(env_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    try:
        wait_for(
            lambda: (
                " started: up to " in log_path.read_text(errors="replace")
                or runner.poll() is not None
            ),
            timeout=120,
            interval=0.2,
            what="the runner to start",
        )
        assert runner.poll() is None, log_path.read_text(errors="replace")
    finally:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            runner.kill()
            runner.wait()
