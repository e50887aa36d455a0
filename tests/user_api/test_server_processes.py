"""``python -m user_api`` as real processes: several workers on one PostgreSQL
database start together (migrations and the bootstrap admin once), and SQLite
refuses more than one."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from labcloud.auth.local import generate_private_key_pem
from labcloud.db import create_db_engine, make_session_factory, migrate, unit_of_work
from tests.e2e.stack import free_port
from tests.user_api.conftest import TEST_CATALOG
from tests.user_api.helpers import PASSWORD
from tests.waiting import wait_for
from user_api.app import MIGRATIONS
from user_api.auth.service import ensure_bootstrap_admin
from user_api.models import User

ADMIN = "admin@example.org"


def write_env(path: Path, database_url: str, data: Path) -> Path:
    key = generate_private_key_pem().replace("\n", "\\n")
    path.write_text(
        "\n".join(
            [
                "INTERNAL_API_KEY_SECRET=internal-key-for-tests-0123456789",
                f'LOCAL_AUTH_PRIVATE_KEY="{key}"',
                f"DATABASE_URL={database_url}",
                f"USER_DATA_ROOT_PATH={data}",
                f"APPLICATION_CONFIG_FILE={TEST_CATALOG}",
                "WORKERFACING_API_URL=http://127.0.0.1:9",
                f"BOOTSTRAP_ADMIN_EMAIL={ADMIN}",
                f"BOOTSTRAP_ADMIN_PASSWORD={PASSWORD}",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.postgres
def test_concurrent_starts_migrate_and_bootstrap_once(postgres_database: str) -> None:
    engines = [create_db_engine(postgres_database) for _ in range(4)]
    errors: list[BaseException] = []

    def start(index: int) -> None:
        try:
            migrate(engines[index], MIGRATIONS)
            with unit_of_work(make_session_factory(engines[index])) as session:
                ensure_bootstrap_admin(session, email=ADMIN, password=PASSWORD)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        with unit_of_work(make_session_factory(engines[0])) as session:
            assert session.scalar(select(func.count()).select_from(User)) == 1
    finally:
        for engine in engines:
            engine.dispose()


@pytest.mark.postgres
def test_several_workers_serve_one_postgresql_database(
    tmp_path: Path, postgres_database: str
) -> None:
    env_file = write_env(tmp_path / "user-api.env", postgres_database, tmp_path / "data")
    port = free_port()
    log_path = tmp_path / "user-api.log"
    log = log_path.open("wb")
    command = [sys.executable, "-m", "user_api", "--port", str(port), "--workers", "2"]
    process = subprocess.Popen(
        [*command, "--env-file", str(env_file)],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        token = None
        while time.monotonic() < deadline and token is None:
            assert process.poll() is None, (tmp_path / "user-api.log").read_text()
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/token",
                    data={"username": ADMIN, "password": PASSWORD},
                )
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            assert answer.status_code == 201, answer.text
            token = answer.json()["id_token"]
        assert token is not None, "the server did not come up"
        headers = {"Authorization": f"Bearer {token}"}
        # Requests spread over both workers: all of them see the same accounts.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            for _ in range(20):
                assert client.get("/user").json()["email"] == ADMIN
        # A rolling restart: new processes start (migrations find nothing to do)
        # while the old ones serve, then take over.
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "all server processes replaced" in log_path.read_text(), 120)
        answer = httpx.get(f"http://127.0.0.1:{port}/user", headers=headers)
        assert answer.json()["email"] == ADMIN
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    output = (tmp_path / "user-api.log").read_text()
    assert output.count("Started server process") == 4, output
    assert "user_api" in output  # the service's own logs reach the output in workers too
    engine = create_db_engine(postgres_database)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            assert session.scalar(select(func.count()).select_from(User)) == 1
    finally:
        engine.dispose()


def run_user_api(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m user_api ARGS`` run to its end (these starts all fail)."""
    return subprocess.run(
        [sys.executable, "-m", "user_api", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_several_workers_need_postgresql(tmp_path: Path) -> None:
    env_file = write_env(tmp_path / "user-api.env", f"sqlite:///{tmp_path}/u.db", tmp_path)
    finished = run_user_api(tmp_path, "--workers", "2", "--env-file", str(env_file))
    assert finished.returncode == 2
    assert "--workers > 1 needs PostgreSQL" in finished.stderr


def test_a_missing_env_file_is_named(tmp_path: Path) -> None:
    finished = run_user_api(tmp_path, "--env-file", str(tmp_path / "nope.env"))
    assert finished.returncode == 1  # SystemExit with a message
    assert "env file not found" in finished.stderr


@pytest.mark.postgres
def test_several_workers_refuse_a_port_in_use(tmp_path: Path, postgres_database: str) -> None:
    env_file = write_env(tmp_path / "user-api.env", postgres_database, tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        finished = run_user_api(
            tmp_path, "--workers", "2", "--port", port, "--env-file", str(env_file)
        )
    assert finished.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in finished.stderr
