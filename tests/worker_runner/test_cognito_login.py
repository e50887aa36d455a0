"""The runner's client logs in through Cognito when the worker API's ``/access_info``
names a user pool (as DECODE's worker does), and renews its token before it
expires: with the refresh token, and with its password once that is refused.

The worker API is a stand-in on loopback that verifies each bearer token as the
real one does (the pool's JWKS on moto's server, RS256, issuer, audience)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from labcloud.auth import InvalidToken, Principal
from labcloud.auth.local import cognito_verifier
from labcloud.contract import Group
from tests.aws import MotoServer
from tests.cognito import CognitoPool, create_pool
from worker_runner.client import AuthenticationFailed, WorkerApiClient

WORKER = "runner-1@example.org"
PASSWORD = "runner-pass-1"


@dataclass
class CognitoWorkerApi:
    """Answers ``/access_info`` with the pool and ``GET /jobs`` with ``{}`` to a
    valid worker token, recording who called with which token."""

    pool: CognitoPool
    url: str = ""
    callers: list[tuple[Principal, str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.verifier = cognito_verifier(
            jwks_url=self.pool.jwks_url, issuer=self.pool.issuer, client_id=self.pool.client_id
        )


def _handler(api: CognitoWorkerApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/access_info":
                pool = api.pool
                cognito = {
                    "user_pool_id": pool.pool_id,
                    "client_id": pool.client_id,
                    "region": pool.region,
                }
                self._reply(200, {"cognito": cognito, "auth": "cognito"})
                return
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            try:
                principal = api.verifier.verify(token)
            except InvalidToken as exc:
                api.refused.append(exc.message)
                self._reply(401, {"detail": exc.message})
                return
            if not principal.has(Group.WORKERS):
                self._reply(403, {"detail": "not a worker"})
                return
            api.callers.append((principal, token))
            self._reply(200, {})

    return Handler


@pytest.fixture
def pool(aws: MotoServer) -> CognitoPool:
    pool = create_pool(aws)
    pool.add_user(WORKER, PASSWORD, Group.WORKERS)
    return pool


@pytest.fixture
def worker_api(pool: CognitoPool) -> Iterator[CognitoWorkerApi]:
    api = CognitoWorkerApi(pool)
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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_client(api: CognitoWorkerApi, clock: Clock, password: str = PASSWORD) -> WorkerApiClient:
    # No AUTH_URL: a runner of a Cognito stack needs none.
    return WorkerApiClient(
        api_url=api.url, auth_url=None, username=WORKER, password=password, clock=clock
    )


def test_the_runner_logs_in_through_cognito_and_refreshes(
    worker_api: CognitoWorkerApi, pool: CognitoPool
) -> None:
    clock = Clock()
    with make_client(worker_api, clock) as client:
        client.authenticate()
        assert client.pull_jobs({"memory": 1}) == {}
        assert client.pull_jobs({"memory": 1}) == {}
        principal, first = worker_api.callers[0]
        assert principal.name == WORKER and principal.has(Group.WORKERS)
        assert [token for _, token in worker_api.callers] == [first, first]  # one login

        # The password changes: only the refresh token can renew the login now.
        pool.idp.admin_set_user_password(
            UserPoolId=pool.pool_id, Username=WORKER, Password="changed-pass-2", Permanent=True
        )
        clock.now += 3600 - 30  # within the last minute of the token's hour
        assert client.pull_jobs({"memory": 1}) == {}
        _, renewed = worker_api.callers[-1]
        assert renewed != first
        assert client.cognito_login is not None and client.cognito_login.refreshes == 1
        assert worker_api.refused == []


def test_a_refused_refresh_token_means_a_new_login(
    worker_api: CognitoWorkerApi, pool: CognitoPool
) -> None:
    clock = Clock()
    with make_client(worker_api, clock) as client:
        client.pull_jobs({"memory": 1})
        pool.idp.admin_user_global_sign_out(UserPoolId=pool.pool_id, Username=WORKER)
        clock.now += 3600
        assert client.pull_jobs({"memory": 1}) == {}
        assert len({token for _, token in worker_api.callers}) == 2
        assert client.cognito_login is not None and client.cognito_login.refreshes == 0


def test_wrong_or_disabled_credentials_stop_the_runner(
    worker_api: CognitoWorkerApi, pool: CognitoPool
) -> None:
    with make_client(worker_api, Clock(), password="wrong-pass-9") as client:
        with pytest.raises(AuthenticationFailed) as caught:
            client.authenticate()
        assert caught.value.status_code == 401
    pool.idp.admin_disable_user(UserPoolId=pool.pool_id, Username=WORKER)
    with (
        make_client(worker_api, Clock()) as client,
        pytest.raises(AuthenticationFailed, match="disabled"),
    ):
        client.authenticate()


def test_an_app_client_with_a_secret_gets_its_secret_hash(aws: MotoServer) -> None:
    pool = create_pool(aws, name="confidential", with_secret=True)
    assert pool.client_secret
    pool.add_user(WORKER, PASSWORD, Group.WORKERS)
    api = CognitoWorkerApi(pool)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    clock = Clock()
    try:
        for secret, refreshes in ((pool.client_secret, 1), ("not-the-secret", 0)):
            with WorkerApiClient(
                api_url=api.url,
                auth_url=None,
                username=WORKER,
                password=PASSWORD,
                cognito_secret=secret,
                clock=clock,
            ) as client:
                client.pull_jobs({"memory": 1})
                clock.now += 3600
                # moto checks the hash of refreshes: a wrong one means a new login.
                assert client.pull_jobs({"memory": 1}) == {}
                assert client.cognito_login is not None
                assert client.cognito_login.refreshes == refreshes
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
