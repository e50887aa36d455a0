"""Real LabCloud processes on loopback for end-to-end tests and benchmarks: the user
API and the worker API under uvicorn, and worker runners, each in its own process.

Every stack has its own worker account names, so the runners of two stacks on one
Docker engine never take each other's containers for their own leftovers."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from labcloud.auth.local import generate_private_key_pem

REPO_ROOT = Path(__file__).resolve().parents[2]
# Service processes keep compiled bytecode here, outside the tree, even where the
# environment says not to write it: without it every start (and every restart a
# test makes) compiles all of FastAPI, SQLAlchemy and Alembic again, seconds each.
BYTECODE_CACHE = Path(tempfile.gettempdir()) / "labcloud-pycache"
PASSWORD = "correct-horse-1"
ADMIN = "admin@example.org"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    """One service process whose output goes to a log file; it can be stopped,
    killed and started again (the log file is appended to)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            env = {**os.environ, "PYTHONPYCACHEPREFIX": str(BYTECODE_CACHE), **self.env}
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            self.process = subprocess.Popen(
                [sys.executable, "-m", *self.args],
                env=env,
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

    def kill(self) -> None:
        """``kill -9``: no handler runs, nothing is cleaned up."""
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Stack:
    """A complete local stack in ``root``: SQLite databases (unless URLs are given), a
    data folder, local auth. Before ``start``, ``user_api.env``, ``worker_api.env``
    and ``runner_env`` may be updated to change the settings of the user API, the
    worker API and the runners."""

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
        self.user_db = user_db or f"sqlite:///{root / 'user_api.db'}"
        self.queue_db = queue_db or f"sqlite:///{root / 'worker_api.db'}"
        # The default runners' account; its name labels their containers.
        self.worker = f"runner-{secrets.token_hex(4)}@example.org"
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
                "DATABASE_URL": self.user_db,
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
                "QUEUE_DB_URL": self.queue_db,
                "PUBLIC_URL": self.worker_url,
                "USERFACING_API_URL": self.user_url,
                "TIMEOUT_FAILURE": "60",
            },
            logs,
        )
        self.runner_env = {
            "API_URL": self.worker_url,
            "AUTH_URL": self.user_url,
            "USERNAME": self.worker,
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
        self._accounts: set[str] = set()

    def start(self, runners: int = 1) -> None:
        """Start both APIs, then ``runners`` runners sharing the default account."""
        self.user_api.start()
        wait_ready(self.user_url, self.user_api)
        self.worker_api.start()
        wait_ready(self.worker_url, self.worker_api)
        self.add_worker_account(self.worker)
        for index in range(runners):
            runner = Process(f"runner-{index}", ["worker_runner"], self.runner_env, self._logs)
            runner.start()
            self.runners.append(runner)

    def add_worker_account(self, email: str) -> None:
        """Create a worker account (group ``workers``) unless it exists."""
        if email in self._accounts:
            return
        created = httpx.post(
            f"{self.user_url}/user",
            data={"username": email, "password": PASSWORD, "groups": ["workers"]},
            headers=self.token(ADMIN),
        )
        assert created.status_code in (201, 409), created.text
        self._accounts.add(email)

    def add_runner(
        self, name: str, *, env: Mapping[str, str] | None = None, start: bool = True
    ) -> Process:
        """A runner with its own worker account (``<name>-<random>@example.org``) and
        its own job folder, as on another host."""
        account = f"{name}-{secrets.token_hex(4)}@example.org"
        self.add_worker_account(account)
        jobs = self.root / f"jobs-{name}"
        runner = Process(
            name,
            ["worker_runner"],
            {
                **self.runner_env,
                "USERNAME": account,
                "PATH_BASE": str(jobs),
                "PATH_HOST_BASE": str(jobs),
                **(env or {}),
            },
            self._logs,
        )
        if start:
            runner.start()
        self.runners.append(runner)
        return runner

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

    def restart(self, process: Process, sig: int = signal.SIGTERM) -> float:
        """Stop ``process`` with ``sig`` and start it again; for an API, wait until it
        answers. Returns the seconds it was unavailable."""
        began = time.monotonic()
        process.stop(sig)
        process.start()
        if process is self.user_api:
            wait_ready(self.user_url, process)
        elif process is self.worker_api:
            wait_ready(self.worker_url, process)
        return time.monotonic() - began


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
        time.sleep(0.05)
    raise RuntimeError(f"{process.name} not ready after {timeout} s:\n{process.log()[-4000:]}")
