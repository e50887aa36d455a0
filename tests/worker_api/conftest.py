"""Queue databases on SQLite and PostgreSQL (built by the migrations), jobs to put
in them, and a stand-in user API on loopback that serves a JWKS and records the
status updates it receives."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from labcloud.auth.local import LocalTokenIssuer, generate_private_key_pem
from labcloud.contract import (
    AppSpec,
    Environment,
    HandlerSpec,
    HardwareSpec,
    JobSpecs,
    MetaSpec,
    PathsUpload,
    QueueJob,
)
from labcloud.db import create_db_engine, make_session_factory, migrate
from worker_api.app import MIGRATIONS, create_app
from worker_api.settings import WorkerApiSettings

# -- databases ------------------------------------------------------------------


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def queue_postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A throwaway PostgreSQL database for this test session, migrated once."""
    name = f"labcloud_test_{secrets.token_hex(6)}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        engine = create_db_engine(url)
        migrate(engine, MIGRATIONS)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty, migrated queue database: a fresh SQLite file, or the session's
    PostgreSQL database emptied."""
    if request.param == "sqlite":
        engine = create_db_engine(f"sqlite:///{tmp_path / 'queue.db'}")
        migrate(engine, MIGRATIONS)
    else:
        engine = create_db_engine(request.getfixturevalue("queue_postgres_url"), pool_size=8)
        with engine.begin() as connection:
            connection.execute(text("TRUNCATE queued_jobs, status_outbox RESTART IDENTITY"))
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


# -- jobs -----------------------------------------------------------------------


def queue_job(
    job_id: int,
    *,
    environment: Environment | None = Environment.LOCAL,
    priority: int = 0,
    hardware: HardwareSpec | None = None,
    files_down: dict[str, str] | None = None,
    user: str = "u1",
) -> QueueJob:
    """A job as the user API would enqueue it."""
    return QueueJob(
        job=JobSpecs(
            app=AppSpec(cmd=["echo", str(job_id)], env={"RUN": str(job_id)}),
            handler=HandlerSpec(
                image_url="busybox:latest",
                files_down=files_down or {},
                files_up={"output": "output", "log": "log"},
            ),
            meta=MetaSpec(job_id=job_id, date_created=datetime(2025, 1, 1, tzinfo=UTC)),
            hardware=hardware or HardwareSpec(),
        ),
        environment=environment,
        priority=priority,
        paths_upload=PathsUpload(
            output=f"{user}/output/job{job_id}",
            log=f"{user}/log/job{job_id}",
            artifact=f"{user}/artifact/job{job_id}",
        ),
    )


# -- a stand-in user API ---------------------------------------------------------


@dataclass
class FakeUserApi:
    """Serves ``GET /.well-known/jwks.json`` and records ``PUT /_job_status``.

    ``answers`` are the status codes to give the next status updates (204 once it
    runs out); every update received is recorded, acknowledged or not."""

    issuer: LocalTokenIssuer
    url: str = ""
    answers: list[int] = field(default_factory=list)
    received: list[tuple[int, dict[str, Any], str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # What GET /_accounts/{subject} answers, by subject ({"active": true} otherwise).
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def acknowledged(self) -> list[tuple[int, str]]:
        """(job_id, status) of the updates answered with success, in order."""
        with self.lock:
            return [
                (body["job_id"], body["status"])
                for code, body, _key in self.received
                if 200 <= code < 300
            ]

    def token(
        self, name: str = "worker1@example.org", groups: tuple[str, ...] = ("workers",)
    ) -> str:
        return self.issuer.issue(subject=name.split("@")[0], email=name, groups=list(groups))

    def headers(self, name: str = "worker1@example.org", *groups: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(name, groups or ('workers',))}"}


def _handler(api: FakeUserApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, code: int, body: bytes = b"") -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/.well-known/jwks.json":
                self._reply(200, json.dumps(api.issuer.jwks()).encode())
            elif self.path.startswith("/_accounts/"):
                with api.lock:
                    answer = api.accounts.get(self.path.removeprefix("/_accounts/"))
                self._reply(200, json.dumps(answer or {"active": True}).encode())
            else:
                self._reply(404, b"{}")

        def do_POST(self) -> None:
            # The token endpoint, for a runner logging in as worker1.
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/token":
                body = {"id_token": api.token(), "expires_in": 3600}
                self._reply(201, json.dumps(body).encode())
            else:
                self._reply(404, b"{}")

        def do_PUT(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with api.lock:
                code = api.answers.pop(0) if api.answers else 204
                api.received.append((code, body, self.headers.get("x-api-key")))
            self._reply(code)

    return Handler


@pytest.fixture
def fake_user_api() -> Iterator[FakeUserApi]:
    api = FakeUserApi(LocalTokenIssuer(generate_private_key_pem(), lifetime_seconds=3600))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def postgres_factory(queue_postgres_url: str) -> Iterator[sessionmaker[Session]]:
    """The session's PostgreSQL queue database, emptied: for behaviour that only
    PostgreSQL has (row locks held by concurrent transactions, query plans)."""
    engine = create_db_engine(queue_postgres_url, pool_size=8)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE queued_jobs, status_outbox RESTART IDENTITY"))
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


KEY = "internal-key-for-tests-0123456789"
INTERNAL = {"x-api-key": KEY}
ClientFactory = Callable[..., TestClient]


def app_clients(
    tmp_path: Path, fake_user_api: FakeUserApi, **defaults: Any
) -> Iterator[ClientFactory]:
    """For a fixture to ``yield from``: a factory that starts the app (lifespan
    included) with test settings, then ``defaults``, then the call's overrides;
    every app started is stopped at the end."""
    clients: list[TestClient] = []

    def start(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {
            "internal_api_key_secret": KEY,
            "userfacing_api_url": fake_user_api.url,
            "queue_db_url": f"sqlite:///{tmp_path / 'queue.db'}",
            "user_data_root_path": tmp_path / "data",
            "public_url": "http://testserver",
            "status_forward_poll_seconds": 0.05,
            "status_forward_retry_max_seconds": 0.05,
            **defaults,
            **overrides,
        }
        client = TestClient(create_app(WorkerApiSettings(_env_file=None, **values)))
        client.__enter__()
        clients.append(client)
        return client

    try:
        yield start
    finally:
        for client in clients:
            client.__exit__(None, None, None)


def enqueue(client: TestClient, job_id: int, **options: Any) -> dict[str, Any]:
    response = client.post(
        "/_jobs", json=queue_job(job_id, **options).model_dump(mode="json"), headers=INTERNAL
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def pull(client: TestClient, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    response = client.get("/jobs", params={"memory": 8000, **params}, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
