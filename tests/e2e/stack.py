"""Real LabCloud processes on loopback for end-to-end tests: the user API and the
worker API under uvicorn, and worker runners, each in its own process."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from labcloud.auth.local import generate_private_key_pem

REPO_ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct-horse-1"
ADMIN = "admin@example.org"
WORKER = "runner@example.org"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    """One service process whose output goes to a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *self.args],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Stack:
    """A complete local stack in ``root``: SQLite databases, a data folder, local auth."""

    def __init__(
        self,
        root: Path,
        catalog: Path,
        *,
        user_db: str | None = None,
        queue_db: str | None = None,
    ) -> None:
        self.root = root
        self.user_port = free_port()
        self.worker_port = free_port()
        self.user_url = f"http://127.0.0.1:{self.user_port}"
        self.worker_url = f"http://127.0.0.1:{self.worker_port}"
        logs = root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        common = {
            "INTERNAL_API_KEY_SECRET": secrets.token_urlsafe(24),
            "USER_DATA_ROOT_PATH": str(root / "data"),
            "LOG_LEVEL": "INFO",
        }
        self.user_api = Process(
            "user-api",
            ["user_api", "--port", str(self.user_port)],
            {
                **common,
                "DATABASE_URL": user_db or f"sqlite:///{root / 'user_api.db'}",
                "LOCAL_AUTH_PRIVATE_KEY": generate_private_key_pem(),
                "PUBLIC_URL": self.user_url,
                "WORKERFACING_API_URL": self.worker_url,
                "APPLICATION_CONFIG_FILE": str(catalog),
                "ALLOW_SELF_SIGNUP": "true",
                "BOOTSTRAP_ADMIN_EMAIL": ADMIN,
                "BOOTSTRAP_ADMIN_PASSWORD": PASSWORD,
                "FORWARD_RETRY_MAX_SECONDS": "0.5",
            },
            logs,
        )
        self.worker_api = Process(
            "worker-api",
            ["worker_api", "--port", str(self.worker_port)],
            {
                **common,
                "QUEUE_DB_URL": queue_db or f"sqlite:///{root / 'worker_api.db'}",
                "PUBLIC_URL": self.worker_url,
                "USERFACING_API_URL": self.user_url,
                "TIMEOUT_FAILURE": "60",
            },
            logs,
        )
        self.runner_env = {
            "API_URL": self.worker_url,
            "AUTH_URL": self.user_url,
            "USERNAME": WORKER,
            "PASSWORD": PASSWORD,
            "PATH_BASE": str(root / "jobs"),
            "PATH_HOST_BASE": str(root / "jobs"),
            "TIMEOUT_STATUS": "1",
            "TIMEOUT_JOB": "1",
            "WAIT": "5",
            "SHUTDOWN_GRACE": "5",
        }
        self.runners: list[Process] = []
        self._logs = logs

    def start(self, runners: int = 1) -> None:
        self.user_api.start()
        wait_ready(self.user_url, self.user_api)
        self.worker_api.start()
        wait_ready(self.worker_url, self.worker_api)
        admin = self.token(ADMIN)
        created = httpx.post(
            f"{self.user_url}/user",
            data={"username": WORKER, "password": PASSWORD, "groups": ["workers"]},
            headers=admin,
        )
        assert created.status_code in (201, 409), created.text
        for index in range(runners):
            runner = Process(f"runner-{index}", ["worker_runner"], self.runner_env, self._logs)
            runner.start()
            self.runners.append(runner)

    def stop(self) -> None:
        for process in [*self.runners, self.worker_api, self.user_api]:
            process.stop()

    def logs(self) -> str:
        return "\n".join(
            f"----- {p.name} -----\n{p.log()[-6000:]}"
            for p in [self.user_api, self.worker_api, *self.runners]
        )

    def token(self, email: str) -> dict[str, str]:
        response = httpx.post(
            f"{self.user_url}/token", data={"username": email, "password": PASSWORD}
        )
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['id_token']}"}

    def user(self, email: str) -> httpx.Client:
        """A client for a new user account, authenticated."""
        created = httpx.post(
            f"{self.user_url}/user", data={"username": email, "password": PASSWORD}
        )
        assert created.status_code == 201, created.text
        return httpx.Client(base_url=self.user_url, headers=self.token(email), timeout=30)


def wait_ready(url: str, process: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.process is not None
        if process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log()[-4000:]}")
        try:
            if httpx.get(f"{url}/access_info", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{process.name} not ready after {timeout} s:\n{process.log()[-4000:]}")


def wait_for(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
