"""``python -m user_api`` stops within seconds of SIGTERM whatever its requests are
doing: it used to wait for every request in flight, for as long as a client took
to send its body."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from labcloud.serve import GRACEFUL_SHUTDOWN_SECONDS
from tests.e2e.stack import free_port
from tests.user_api.test_server_processes import write_env
from tests.waiting import wait_for


def _serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/access_info").status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.postgres)])
def test_sigterm_stops_the_server_despite_a_request_in_flight(
    tmp_path: Path, workers: str, request: pytest.FixtureRequest
) -> None:
    database = (
        f"sqlite:///{tmp_path / 'u.db'}"
        if workers == "1"
        else request.getfixturevalue("postgres_database")
    )
    env_file = write_env(tmp_path / "user-api.env", database, tmp_path / "data")
    port = free_port()
    log = (tmp_path / "user-api.log").open("wb")
    command = [sys.executable, "-m", "user_api", "--port", str(port), "--workers", workers]
    process = subprocess.Popen(
        [*command, "--env-file", str(env_file)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    slow_client = socket.socket()
    try:
        wait_for(lambda: _serving(port), 60, what="the server to answer")
        slow_client.settimeout(60)
        slow_client.connect(("127.0.0.1", port))
        # A request whose body never completes. The server's "100 Continue" says
        # the application is reading the body: the request is in flight.
        slow_client.sendall(
            b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 100000\r\n\r\n"
        )
        assert slow_client.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        slow_client.sendall(b'{"job_name": ')
        process.send_signal(signal.SIGTERM)
        # Generous against the grace period, far short of "never".
        process.wait(timeout=GRACEFUL_SHUTDOWN_SECONDS + 25)
    finally:
        slow_client.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    # uvicorn ends a single process by raising the signal again once it has stopped.
    expected = 0 if workers == "2" else -signal.SIGTERM
    assert process.returncode == expected, (tmp_path / "user-api.log").read_text()
    assert "timeout graceful shutdown exceeded" in (tmp_path / "user-api.log").read_text()
