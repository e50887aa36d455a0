"""Jobs' results within their owner's remaining quota: the worker API learns what is
left from the user API's account state, refuses results over it, caps its upload
URLs at it and reports what it wrote, which the user API counts. The user API runs
on loopback (uvicorn) with its database on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select, update

from labcloud.auth.local import generate_private_key_pem
from labcloud.contract import INTERNAL_API_KEY_HEADER
from labcloud.db import unit_of_work
from labcloud.storage.local import LocalStorage
from labcloud.storage.quota import StorageLimitReached
from labcloud.storage.signing import Audience, UrlSigner
from labcloud.storage.transfers import LocalTransfers
from labcloud.storage.uploads import IncomingFile
from tests.e2e.stack import free_port
from tests.waiting import wait_for
from tests.worker_api.conftest import ClientFactory, FakeUserApi, app_clients, enqueue, pull
from user_api.app import create_app
from user_api.models import User
from user_api.settings import UserApiSettings
from worker_api.clients.accounts import AccountChecker
from worker_api.files import service
from worker_api.files.service import LOG_ALLOWANCE_BYTES, UploadTarget

CATALOG = Path(__file__).resolve().parents[1] / "data" / "application_config.yaml"
ADMIN = "admin@example.org"
KEY = secrets.token_urlsafe(24)


@dataclass(frozen=True)
class UserApi:
    url: str
    subject: str
    app: Any

    def state(self) -> dict[str, Any]:
        answer = httpx.get(
            f"{self.url}/_accounts/{self.subject}", headers={INTERNAL_API_KEY_HEADER: KEY}
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body


@pytest.fixture
def user_api(tmp_path: Path, database_url: str) -> Iterator[UserApi]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = UserApiSettings(
        _env_file=None,
        internal_api_key_secret=KEY,
        local_auth_private_key=generate_private_key_pem(),
        database_url=database_url,
        user_data_root_path=tmp_path / "data",
        application_config_file=CATALOG,
        workerfacing_api_url="http://127.0.0.1:9",  # nothing listens: no jobs here
        public_url=url,
        bootstrap_admin_email=ADMIN,
        bootstrap_admin_password="correct-horse-1",
    )
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=60, what="the user API to start")
        state: Any = app.state
        with unit_of_work(state.session_factory) as session:
            subject = session.scalars(select(User.subject).where(User.email == ADMIN)).one()
            session.execute(update(User).where(User.email == ADMIN).values(max_storage_bytes=1000))
        yield UserApi(url, subject, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class Switch(httpx.BaseTransport):
    """Loopback HTTP that can be cut (``down``), as in a user API outage."""

    def __init__(self) -> None:
        self.down = False
        self._real = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        return self._real.handle_request(request)


@pytest.fixture
def link() -> Switch:
    return Switch()


@pytest.fixture
def checker(user_api: UserApi, link: Switch) -> Iterator[AccountChecker]:
    accounts = AccountChecker(user_api_url=user_api.url, api_key=KEY, ttl_seconds=0, transport=link)
    yield accounts
    accounts.close()


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    """The worker API's view of the same files as the user API's."""
    transfers = LocalTransfers(
        UrlSigner(b"w" * 32), base_url="http://127.0.0.1:8001", audience=Audience.WORKER_API
    )
    return LocalStorage(tmp_path / "data", transfers=transfers)


def store(
    storage: LocalStorage, accounts: AccountChecker, folder: str, name: str, size: int
) -> None:
    service.store_results(storage, accounts, folder, [IncomingFile(name, io.BytesIO(b"r" * size))])


def test_results_within_the_remaining_quota_are_stored_and_counted(
    user_api: UserApi, checker: AccountChecker, storage: LocalStorage
) -> None:
    output = f"{user_api.subject}/output/job-1"
    storage.write(f"{user_api.subject}/data/own.bin", io.BytesIO(b"o" * 300))
    state = user_api.state()
    assert (state["bytes_used"], state["remaining_storage_bytes"]) == (300, 700)

    store(storage, checker, output, "a.csv", 600)
    # Reported to the user API as written, and counted there at once.
    state = user_api.state()
    assert (state["bytes_used"], state["remaining_storage_bytes"]) == (900, 100)
    with pytest.raises(StorageLimitReached, match="storage limit reached"):
        store(storage, checker, output, "b.csv", 101)
    assert storage.stat(f"{output}/b.csv") is None
    store(storage, checker, output, "b.csv", 100)
    assert user_api.state()["remaining_storage_bytes"] == 0

    # At the limit, no URL for more results; the log still has its allowance.
    with pytest.raises(StorageLimitReached, match="no more results can be uploaded"):
        service.upload_request(storage, checker, UploadTarget(output), expires_in=60)
    log = service.upload_request(
        storage, checker, UploadTarget(f"{user_api.subject}/log/job-1"), expires_in=60
    )
    token = log.url.rsplit("/", 1)[1]
    assert storage.transfers.upload(token).max_bytes == LOG_ALLOWANCE_BYTES


def test_an_upload_url_carries_the_remaining_quota(
    user_api: UserApi, checker: AccountChecker, storage: LocalStorage
) -> None:
    storage.write(f"{user_api.subject}/data/own.bin", io.BytesIO(b"o" * 250))
    request = service.upload_request(
        storage, checker, UploadTarget(f"{user_api.subject}/output/job-1"), expires_in=60
    )
    assert storage.transfers.upload(request.url.rsplit("/", 1)[1]).max_bytes == 750


def test_writes_the_user_api_did_not_take_still_count_and_are_sent_later(
    user_api: UserApi, checker: AccountChecker, storage: LocalStorage, link: Switch
) -> None:
    output = f"{user_api.subject}/output/job-1"
    assert user_api.state()["bytes_used"] == 0
    checker.account(user_api.subject)  # an answer is known from before the outage
    link.down = True
    store(storage, checker, output, "a.csv", 700)
    # The report failed: this process still counts the bytes against the quota.
    assert checker.used(user_api.subject) == 700
    with pytest.raises(StorageLimitReached):
        store(storage, checker, output, "b.csv", 301)
    link.down = False
    store(storage, checker, output, "b.csv", 200)
    # Both writes reached the user API with the next report.
    state = user_api.state()
    assert (state["bytes_used"], state["remaining_storage_bytes"]) == (900, 100)
    assert checker.used(user_api.subject) == 900


def test_the_usage_route_checks_its_caller_and_input(user_api: UserApi) -> None:
    route = f"{user_api.url}/_accounts/{user_api.subject}/usage"
    assert httpx.post(route, json={"bytes": 5}).status_code == 401
    key = {INTERNAL_API_KEY_HEADER: KEY}
    for body in ({"bytes": "lots"}, {"bytes": 2**63}, {}, {"bytes": 1, "more": 2}):
        assert httpx.post(route, json=body, headers=key).status_code == 422, body
    assert user_api.state()["bytes_used"] == 0  # counted from storage: nothing yet
    answer = httpx.post(route, json={"bytes": 5}, headers=key)
    assert answer.status_code == 200
    assert (answer.json()["bytes_used"], answer.json()["remaining_storage_bytes"]) == (5, 995)


# -- through the worker API's routes ----------------------------------------------------


@pytest.fixture
def worker_api(tmp_path: Path, fake_user_api: FakeUserApi) -> Iterator[ClientFactory]:
    yield from app_clients(tmp_path, fake_user_api, account_check_ttl_seconds=0)


def test_a_workers_upload_over_the_owners_remaining_quota_is_refused(
    worker_api: ClientFactory, fake_user_api: FakeUserApi, tmp_path: Path
) -> None:
    client = worker_api()
    # This stand-in user API counts nothing itself: it always says 900 of 1000 are
    # used, and takes no reports (the worker API keeps counting what it wrote).
    fake_user_api.accounts["u1"] = {
        "active": True,
        "max_storage_bytes": 1000,
        "bytes_used": 900,
        "remaining_storage_bytes": 100,
    }
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1)["id"])
    pull(client, worker)

    def direct(size: int) -> Any:
        return client.post(
            f"/jobs/{queue_id}/files/upload",
            params={"type": "output"},
            files={"file": ("a.bin", b"a" * size)},
            headers=worker,
        )

    over = direct(101)
    assert over.status_code == 413
    assert "you store 900 bytes of your limit of 1,000 bytes" in over.json()["detail"]
    url = client.post(f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker)
    refused = client.request(**url.json(), files={"file": ("a.bin", b"a" * 101)})
    assert refused.status_code == 413
    assert "100 bytes its upload URL allows" in refused.json()["detail"]
    assert not (tmp_path / "data/u1/output/job1/a.bin").exists()
    assert direct(100).status_code == 201
    # Now nothing is left: no URL for more results.
    none_left = client.post(
        f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker
    )
    assert none_left.status_code == 413
    assert "no more results can be uploaded" in none_left.json()["detail"]
