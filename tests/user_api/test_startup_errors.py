"""``python -m user_api`` that cannot start says why in one line, not a traceback:
a catalog it cannot read (a local file or an S3 object), a database it cannot
reach; with one server process or several. A bug at start keeps its traceback
(tests/labcloud/test_serve.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from uvicorn.config import STARTUP_FAILURE

from tests.aws import MotoServer
from tests.user_api.test_server_processes import write_env


def start_user_api(env_file: Path, *, workers: int = 1) -> tuple[int, str]:
    done = subprocess.run(
        [
            sys.executable,
            *("-m", "user_api", "--port", "0", "--workers", str(workers)),
            *("--env-file", str(env_file)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )
    return done.returncode, done.stdout + done.stderr


def with_setting(env_file: Path, line: str) -> Path:
    env_file.write_text(env_file.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    return env_file


def assert_one_line(output: str, *words: str) -> None:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "cannot start:" in line]
    assert len(lines) >= 1, output
    for word in words:
        assert word in lines[0], output


def test_a_missing_catalog_file(tmp_path: Path) -> None:
    env_file = write_env(tmp_path / ".env", f"sqlite:///{tmp_path}/db.sqlite", tmp_path / "data")
    with_setting(env_file, f"APPLICATION_CONFIG_FILE={tmp_path}/missing.yaml")
    code, output = start_user_api(env_file)
    assert code == STARTUP_FAILURE
    assert_one_line(output, "missing.yaml")


def test_an_unreachable_database(tmp_path: Path) -> None:
    env_file = write_env(
        tmp_path / ".env", "postgresql+psycopg://labcloud@127.0.0.1:9/none", tmp_path / "data"
    )
    code, output = start_user_api(env_file)
    assert code == STARTUP_FAILURE
    assert_one_line(output, "cannot reach the database", "127.0.0.1")


def test_a_missing_catalog_object_on_s3(tmp_path: Path, aws: MotoServer) -> None:
    env_file = write_env(tmp_path / ".env", f"sqlite:///{tmp_path}/db.sqlite", tmp_path / "data")
    with_setting(env_file, "APPLICATION_CONFIG_FILE=s3://no-such-bucket/catalog.yaml")
    code, output = start_user_api(env_file)
    assert code == STARTUP_FAILURE
    assert_one_line(output, "s3://no-such-bucket/catalog.yaml")


@pytest.mark.postgres
def test_several_processes_report_it_in_one_line(tmp_path: Path, postgres_database: str) -> None:
    env_file = write_env(tmp_path / ".env", postgres_database, tmp_path / "data")
    with_setting(env_file, f"APPLICATION_CONFIG_FILE={tmp_path}/missing.yaml")
    code, output = start_user_api(env_file, workers=2)
    assert code != 0
    assert_one_line(output, "missing.yaml")
