"""Local storage's transfer requests (``download_request``, ``upload_request``,
``upload_into_request``): LabCloud's signed URLs, used over real HTTP against the
API they name (the user API, served by uvicorn on loopback, its database on SQLite
and PostgreSQL)."""

from __future__ import annotations

import io
import secrets
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select

from labcloud.auth.local import generate_private_key_pem
from labcloud.contract import SignedRequest
from labcloud.db import unit_of_work
from labcloud.errors import NotFound
from labcloud.storage import (
    Audience,
    IncomingFile,
    LocalStorage,
    LocalTransfers,
    SignedTransfer,
    TransferPurpose,
    TransfersUnavailable,
    UnsafePath,
    UploadTooLarge,
    UrlSigner,
    signed_url_storage,
    upload_targets,
)
from labcloud.storage.uploads import UploadRefused
from tests.e2e.stack import free_port
from tests.waiting import wait_for
from user_api.app import create_app
from user_api.models import User
from user_api.settings import UserApiSettings

CATALOG = Path(__file__).resolve().parents[2] / "data" / "application_config.yaml"
ADMIN = "admin@example.org"


@dataclass(frozen=True)
class Served:
    """The user API on loopback: its URL, settings, storage, and the subject of an
    active account (the bootstrap administrator) whose files the tests move."""

    url: str
    settings: UserApiSettings
    storage: LocalStorage
    subject: str


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Served]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = UserApiSettings(
        _env_file=None,
        internal_api_key_secret=secrets.token_urlsafe(24),
        local_auth_private_key=generate_private_key_pem(),
        database_url=database_url,
        user_data_root_path=tmp_path / "data",
        application_config_file=CATALOG,
        # Nothing listens there; these tests submit no jobs.
        workerfacing_api_url="http://127.0.0.1:9",
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
        yield Served(url, settings, state.storage, subject)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def send(request: SignedRequest, **extra: Any) -> httpx.Response:
    """The request as a client that knows nothing of LabCloud sends it."""
    return httpx.request(**request.model_dump(), **extra, timeout=30)


def test_a_download_request_fetches_the_file_through_the_api(api: Served) -> None:
    key = f"{api.subject}/data/run/a.txt"
    api.storage.write(key, io.BytesIO(b"input bytes"))
    api.storage.write(f"{api.subject}/data/run/b.txt", io.BytesIO(b"b"))
    request = api.storage.download_request(key, expires_in=60)
    assert (request.method, request.headers, request.data) == ("GET", {}, {})
    assert request.url.startswith(f"{api.url}/_signed/")
    answer = send(request)
    assert (answer.status_code, answer.content) == (200, b"input bytes")
    # Local storage sends a folder as a zip.
    folder = send(api.storage.download_request(f"{api.subject}/data/run", expires_in=60))
    assert folder.status_code == 200
    assert sorted(zipfile.ZipFile(io.BytesIO(folder.content)).namelist()) == ["a.txt", "b.txt"]
    # A download URL uploads nothing.
    posted = httpx.post(request.url, files={"file": ("a.txt", b"x")}, timeout=30)
    assert posted.status_code == 403


def test_an_upload_into_request_stores_the_part_under_its_file_name(api: Served) -> None:
    folder = f"{api.subject}/data/set"
    request = api.storage.upload_into_request(folder, expires_in=60, max_bytes=None)
    assert (request.method, request.headers, request.data) == ("POST", {}, {})
    stored = send(request, files={"file": ("result.txt", b"result")})
    assert stored.status_code == 201, stored.text
    assert stored.json()["path"] == "data/set/result.txt"
    assert (api.storage.root / folder / "result.txt").read_bytes() == b"result"
    again = send(request, files={"file": ("other.txt", b"x")})
    assert again.status_code == 403
    assert "already been used" in again.json()["detail"]


def test_an_upload_request_stores_one_file_at_its_key(api: Served) -> None:
    key = f"{api.subject}/config/exact.yaml"
    request = api.storage.upload_request(key, expires_in=60, max_bytes=None)
    two = send(request, files=[("file", ("a", b"1")), ("file", ("b", b"2"))])
    assert two.status_code == 400, two.text
    stored = send(request, files={"file": ("whatever-the-client-calls-it", b"k: v\n")})
    assert stored.status_code == 201, stored.text
    assert stored.json()["path"] == "config/exact.yaml"
    assert (api.storage.root / key).read_bytes() == b"k: v\n"


def test_an_upload_request_carries_at_most_max_bytes(api: Served) -> None:
    folder = f"{api.subject}/data/capped"
    request = api.storage.upload_into_request(folder, expires_in=60, max_bytes=10)
    parts = [("file", ("a.bin", b"a" * 6)), ("file", ("b.bin", b"b" * 5))]
    refused = send(request, files=parts)
    assert refused.status_code == 413
    assert "larger than the 10 bytes its upload URL allows" in refused.json()["detail"]
    assert not (api.storage.root / folder).exists()
    # Refused before anything was stored, so the URL still takes what fits.
    assert send(request, files={"file": ("a.bin", b"a" * 10)}).status_code == 201


def test_expired_foreign_and_tampered_urls_are_refused(api: Served) -> None:
    key = f"{api.subject}/data/a.txt"
    api.storage.write(key, io.BytesIO(b"a"))
    signing_key = api.settings.url_signing_key

    def signed_by(audience: Audience, clock: float) -> SignedRequest:
        signer = UrlSigner(signing_key, clock=lambda: clock)
        transfers = LocalTransfers(signer, base_url=api.url, audience=audience)
        return transfers.request(key, TransferPurpose.DOWNLOAD, expires_in=60)

    assert send(signed_by(Audience.USER_API, time.time())).status_code == 200
    expired = send(signed_by(Audience.USER_API, time.time() - 61))
    assert expired.status_code == 403
    assert "expired" in expired.json()["detail"]
    foreign = send(signed_by(Audience.WORKER_API, time.time()))
    assert foreign.status_code == 403
    assert "issued by another service" in foreign.json()["detail"]
    good = api.storage.download_request(key, expires_in=60)
    tampered = good.model_copy(
        update={"url": good.url[:-2] + ("AA" if good.url[-2:] != "AA" else "BB")}
    )
    assert send(tampered).status_code == 403


def test_a_storage_without_transfers_hands_out_no_requests(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert not storage.signs_urls
    with pytest.raises(TransfersUnavailable):
        storage.download_request("u1/data/a.txt", expires_in=60)
    with pytest.raises(TransfersUnavailable):
        storage.upload_into_request("u1/data", expires_in=60, max_bytes=None)
    # Its signed routes answer 404: nothing of it can be redeemed.
    with pytest.raises(NotFound):
        signed_url_storage(storage)
    transfers = LocalTransfers(
        UrlSigner(b"k" * 32), base_url="http://x", audience=Audience.USER_API
    )
    signing = LocalStorage(tmp_path, transfers=transfers)
    assert signed_url_storage(signing) is signing
    with pytest.raises(UnsafePath):
        signing.upload_request("u1/../../etc/passwd", expires_in=60, max_bytes=None)


def _transfer(purpose: TransferPurpose, max_bytes: int | None = None) -> SignedTransfer:
    return SignedTransfer("u1/data/set", purpose, expires_at=0, nonce="n", max_bytes=max_bytes)


def test_where_the_parts_of_a_signed_upload_go() -> None:
    parts = [IncomingFile("a.txt", io.BytesIO(b"a")), IncomingFile("sub/b.txt", io.BytesIO(b"b"))]
    into = upload_targets(_transfer(TransferPurpose.UPLOAD_INTO), parts)
    assert [key for key, _ in into] == ["u1/data/set/a.txt", "u1/data/set/sub/b.txt"]
    one = upload_targets(_transfer(TransferPurpose.UPLOAD), parts[:1])
    assert [key for key, _ in one] == ["u1/data/set"]
    with pytest.raises(UploadRefused, match="one file"):
        upload_targets(_transfer(TransferPurpose.UPLOAD), parts)
    with pytest.raises(UploadTooLarge):
        upload_targets(_transfer(TransferPurpose.UPLOAD_INTO, max_bytes=1), parts)
    assert len(upload_targets(_transfer(TransferPurpose.UPLOAD_INTO, max_bytes=2), parts)) == 2


class _Unseekable(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def test_a_capped_upload_of_unknown_size_is_refused() -> None:
    parts = [IncomingFile("a.txt", _Unseekable())]  # type: ignore[arg-type]
    with pytest.raises(UploadRefused, match="cannot be told"):
        upload_targets(_transfer(TransferPurpose.UPLOAD_INTO, max_bytes=10), parts)
    assert len(upload_targets(_transfer(TransferPurpose.UPLOAD_INTO), parts)) == 1
