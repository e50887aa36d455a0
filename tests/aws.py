"""AWS without AWS: one moto server per test session, fake credentials per test.

``moto_server`` starts ``python -m moto.server`` once for the whole session on a free
loopback port and stops it at the end. ``aws`` is what a test asks for: it points
boto3 at that server through the environment (``AWS_ENDPOINT_URL``, fake credentials,
a region), exactly as a deployment would configure a service, and wipes the server's
state first so tests do not see each other's buckets or secrets. Tests that do not
ask for ``aws`` see no AWS variables at all.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

REGION = "us-east-1"
# Variables that could point boto3 at a real account or another endpoint.
_AWS_VARIABLES_CLEARED = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


@dataclass(frozen=True)
class MotoServer:
    """A running moto server."""

    endpoint_url: str
    region: str = REGION

    def client(self, service: str) -> Any:
        """A boto3 client of ``service`` on this server (boto3's clients are untyped)."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def reset(self) -> None:
        """Forget every resource created so far (moto's own reset route)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_answering(process: subprocess.Popen[bytes], url: str, deadline: float) -> None:
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not answer at {url}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server for the whole session (starting one takes about a second)."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = MotoServer(endpoint_url=f"http://127.0.0.1:{port}")
    try:
        # Generous: the machines are small and often loaded.
        _wait_until_answering(process, f"{server.endpoint_url}/moto-api/", time.monotonic() + 60)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """The moto server, empty, with boto3 pointed at it through the environment."""
    moto_server.reset()
    for name in _AWS_VARIABLES_CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", moto_server.region)
    return moto_server
