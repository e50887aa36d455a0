"""Fair use: active jobs and bytes stored, at, below and above each limit, from an
account's own limits and from the settings' defaults; nothing is written over a
limit."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select

from labcloud.contract import ACTIVE_STATUSES
from labcloud.db import unit_of_work
from labcloud.storage.local import LocalStorage
from tests.user_api.helpers import login, signup
from user_api.app import create_app
from user_api.limits import (
    ActiveJobLimitReached,
    StorageLimitReached,
    UsageLimits,
    bytes_stored,
    limits_of,
    reserve_active_job,
    write_within_storage_limit,
)
from user_api.models import Job, User, WorkerOutbox
from user_api.settings import UserApiSettings

APP = {"application": "demo", "version": "latest", "entrypoint": "wordcount"}


def _rows(client: TestClient, model: type[Job] | type[WorkerOutbox]) -> int:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _job(client: TestClient, headers: dict[str, str], name: str) -> Any:
    body = {
        "job_name": name,
        "application": APP,
        "attributes": {"files_down": {"data_ids": ["set"]}},
    }
    return client.post("/jobs", json=body, headers=headers)


def _upload(client: TestClient, headers: dict[str, str], name: str, size: int) -> Any:
    return client.post(
        "/files/data/set/upload", files={"file": (name, b"x" * size)}, headers=headers
    )


def _set_limits(client: TestClient, email: str, **limits: int | None) -> None:
    admin = login(client, "admin@example.org")
    response = client.put(f"/admin/users/{email}/limits", json=limits, headers=admin)
    assert response.status_code == 200, response.text


def test_limits_of_an_account() -> None:
    defaults = UsageLimits(max_active_jobs=10, max_storage_bytes=1000)
    user = User(max_active_jobs=None, max_storage_bytes=None)
    assert limits_of(user, defaults) == defaults
    user = User(max_active_jobs=0, max_storage_bytes=5)
    assert limits_of(user, defaults) == UsageLimits(max_active_jobs=0, max_storage_bytes=5)
    user = User(max_active_jobs=None, max_storage_bytes=7)
    assert limits_of(user, UsageLimits()) == UsageLimits(max_active_jobs=None, max_storage_bytes=7)


def test_active_job_limit_below_at_and_above(client: TestClient) -> None:
    ada = signup(client, "ada@example.org")
    assert _upload(client, ada, "a.txt", 3).status_code == 201
    _set_limits(client, "ada@example.org", max_active_jobs=2)
    first = _job(client, ada, "job-1")
    assert first.status_code == 201  # below: 0 of 2
    assert _job(client, ada, "job-2").status_code == 201  # reaches the limit: 1 of 2
    over = _job(client, ada, "job-3")
    assert over.status_code == 429
    assert over.json()["detail"].startswith(
        "active job limit reached: 2 of 2 active jobs (queued or running)"
    )
    assert (_rows(client, Job), _rows(client, WorkerOutbox)) == (2, 2)
    # An ended job no longer counts.
    assert client.post(f"/jobs/{first.json()['id']}/cancel", headers=ada).status_code == 200
    assert _job(client, ada, "job-3").status_code == 201
    # Other accounts keep the default.
    bob = signup(client, "bob@example.org")
    assert _upload(client, bob, "a.txt", 3).status_code == 201
    assert _job(client, bob, "job-1").status_code == 201
    # Zero is a limit: nothing may start.
    _set_limits(client, "bob@example.org", max_active_jobs=0)
    refused = _job(client, bob, "job-2")
    assert refused.status_code == 429
    assert "1 of 0 active jobs" in refused.json()["detail"]


def test_active_job_limit_default_from_the_settings(user_settings: UserApiSettings) -> None:
    settings = user_settings.model_copy(update={"default_max_active_jobs": 1})
    with TestClient(create_app(settings)) as client:
        ada = signup(client, "ada@example.org")
        assert _upload(client, ada, "a.txt", 3).status_code == 201
        assert _job(client, ada, "job-1").status_code == 201
        over = _job(client, ada, "job-2")
        assert over.status_code == 429
        assert "1 of 1 active jobs" in over.json()["detail"]
        _set_limits(client, "ada@example.org", max_active_jobs=2)  # its own limit wins
        assert _job(client, ada, "job-2").status_code == 201
    settings = user_settings.model_copy(update={"default_max_active_jobs": None})
    with TestClient(create_app(settings)) as client:  # the same database
        bob = signup(client, "bob@example.org")
        assert _upload(client, bob, "a.txt", 3).status_code == 201
        for index in range(5):  # no default: unlimited
            assert _job(client, bob, f"more-{index}").status_code == 201


def test_storage_limit_below_at_and_above(client: TestClient) -> None:
    ada = signup(client, "ada@example.org")
    _set_limits(client, "ada@example.org", max_storage_bytes=100)
    assert _upload(client, ada, "a.bin", 60).status_code == 201  # below
    assert _upload(client, ada, "b.bin", 40).status_code == 201  # exactly at the limit
    over = _upload(client, ada, "c.bin", 1)
    assert over.status_code == 413
    assert over.json()["detail"] == (
        "storage limit reached: you store 100 bytes of your limit of 100 bytes; "
        "this upload of 1 bytes would exceed it. Delete files you no longer need."
    )
    listed = client.get("/files/data/set", headers=ada).json()
    assert [entry["path"] for entry in listed] == ["data/set/a.bin", "data/set/b.bin"]
    # A replaced file no longer counts: the same size fits, one byte more does not,
    # and the refused upload leaves the old file as it was.
    assert _upload(client, ada, "b.bin", 40).status_code == 201
    assert _upload(client, ada, "b.bin", 41).status_code == 413
    kept = client.get("/files/data/set/b.bin/download", headers=ada)
    assert kept.content == b"x" * 40

    # At the limit no upload URL is handed out.
    at_limit = client.post("/files/data/set/url", headers=ada)
    assert at_limit.status_code == 413
    assert "you store 100 bytes of your limit of 100 bytes" in at_limit.json()["detail"]
    # One handed out carries at most what is left, and the limit is checked again
    # when the upload lands (here after other uploads took some of it).
    assert client.delete("/files/data/set/a.bin", headers=ada).status_code == 204
    signed = client.post("/files/data/set/url", headers=ada).json()
    assert client.post(signed["url"], files={"file": ("d.bin", b"y" * 61)}).status_code == 413
    assert _upload(client, ada, "e.bin", 30).status_code == 201
    refused = client.post(signed["url"], files={"file": ("d.bin", b"y" * 31)})
    assert refused.status_code == 413
    assert client.get("/files/data/set/d.bin", headers=ada).status_code == 404
    assert client.post(signed["url"], files={"file": ("d.bin", b"y" * 30)}).status_code == 201


def test_storage_limit_default_from_the_settings(user_settings: UserApiSettings) -> None:
    settings = user_settings.model_copy(update={"default_max_storage_bytes": 10})
    with TestClient(create_app(settings)) as client:
        ada = signup(client, "ada@example.org")
        assert _upload(client, ada, "a.bin", 10).status_code == 201
        assert _upload(client, ada, "b.bin", 1).status_code == 413
        _set_limits(client, "ada@example.org", max_storage_bytes=11)
        assert _upload(client, ada, "b.bin", 1).status_code == 201
    settings = user_settings.model_copy(update={"default_max_storage_bytes": None})
    with TestClient(create_app(settings)) as client:  # the same database
        bob = signup(client, "bob@example.org")
        assert _upload(client, bob, "big.bin", 100_000).status_code == 201


class _Unseekable(io.RawIOBase):
    """A stream that cannot tell its size in advance."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


class _RacingStream(io.BytesIO):
    """A seekable upload during whose writing another upload lands."""

    def __init__(self, data: bytes, storage: LocalStorage, other_key: str) -> None:
        super().__init__(data)
        self._storage = storage
        self._other_key = other_key
        self._raced = False

    def read(self, size: int | None = -1) -> bytes:
        if not self._raced:
            self._raced = True
            self._storage.write(self._other_key, io.BytesIO(b"z" * 50))
        return super().read(size)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    root = tmp_path / "store"
    root.mkdir()
    return LocalStorage(root)


def test_an_upload_that_crossed_the_limit_is_removed(storage: LocalStorage) -> None:
    storage.write("u1/data/old.bin", io.BytesIO(b"o" * 60))
    # Size unknown: let in while under the limit, removed when it crossed it.
    with pytest.raises(StorageLimitReached, match="the upload was not kept"):
        write_within_storage_limit(
            storage,
            "u1",
            "u1/data/new.bin",
            io.BufferedReader(_Unseekable(b"n" * 50)),
            100,
        )
    assert storage.stat("u1/data/new.bin") is None
    assert bytes_stored(storage, "u1") == 60
    fits = write_within_storage_limit(
        storage, "u1", "u1/data/new.bin", io.BufferedReader(_Unseekable(b"n" * 40)), 100
    )
    assert fits.size == 40
    # Full: an upload of unknown size is refused before writing.
    with pytest.raises(StorageLimitReached, match="you store 100 bytes"):
        write_within_storage_limit(
            storage, "u1", "u1/data/more.bin", io.BufferedReader(_Unseekable(b"")), 100
        )


def test_of_two_racing_uploads_the_one_over_the_limit_is_removed(storage: LocalStorage) -> None:
    racing = _RacingStream(b"r" * 60, storage, "u1/data/other.bin")
    with pytest.raises(StorageLimitReached, match="110 bytes, over your limit of 100"):
        write_within_storage_limit(storage, "u1", "u1/data/mine.bin", racing, 100)
    assert storage.stat("u1/data/mine.bin") is None
    assert bytes_stored(storage, "u1") == 50
    # No limit: written as is.
    entry = write_within_storage_limit(
        storage, "u1", "u1/data/mine.bin", io.BytesIO(b"r" * 500), None
    )
    assert entry.size == 500


@pytest.mark.parametrize("value", ["", "unlimited", "None"])
def test_default_limits_can_be_switched_off_from_the_environment(
    value: str, monkeypatch: pytest.MonkeyPatch, user_settings: UserApiSettings
) -> None:
    monkeypatch.setenv("DEFAULT_MAX_ACTIVE_JOBS", value)
    monkeypatch.setenv("DEFAULT_MAX_STORAGE_BYTES", value)
    base = user_settings.model_dump(
        exclude={"default_max_active_jobs", "default_max_storage_bytes"}
    )
    settings = UserApiSettings(_env_file=None, **base)
    assert settings.default_max_active_jobs is None
    assert settings.default_max_storage_bytes is None
    monkeypatch.setenv("DEFAULT_MAX_ACTIVE_JOBS", "-1")
    with pytest.raises(ValidationError, match="default_max_active_jobs"):
        UserApiSettings(_env_file=None, **base)


def _counted_and_actual(client: TestClient, email: str) -> tuple[int, int]:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        user = session.scalars(select(User).where(User.email == email)).one()
        active = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.user_id == user.id, Job.status.in_([s.value for s in ACTIVE_STATUSES]))
        )
        return user.active_jobs, int(active or 0)


def test_the_active_jobs_counter_follows_every_way_a_job_ends(client: TestClient) -> None:
    """Submissions raise the counter; each first terminal status lowers it once,
    however it is reached (worker, user, admin, deletion); repeats change nothing."""
    ada = signup(client, "ada@example.org")
    admin = login(client, "admin@example.org")
    key = {"x-api-key": client.app.state.settings.internal_api_key_secret.get_secret_value()}  # type: ignore[attr-defined]
    assert _upload(client, ada, "a.txt", 3).status_code == 201
    ids = [_job(client, ada, f"job-{index}").json()["id"] for index in range(6)]
    assert _counted_and_actual(client, "ada@example.org") == (6, 6)

    def report(job_id: int, status: str) -> None:
        body = {"job_id": job_id, "status": status}
        assert client.put("/_job_status", json=body, headers=key).status_code == 200

    steps: list[tuple[str, Any]] = [
        ("pulled", lambda: report(ids[0], "pulled")),
        ("running", lambda: report(ids[0], "running")),
        ("finished", lambda: report(ids[0], "finished")),
        ("finished again", lambda: report(ids[0], "finished")),
        ("error after finished", lambda: report(ids[0], "error")),
        ("error", lambda: report(ids[1], "error")),
        ("user cancel", lambda: client.post(f"/jobs/{ids[2]}/cancel", headers=ada)),
        ("cancel again", lambda: client.post(f"/jobs/{ids[2]}/cancel", headers=ada)),
        ("admin cancel", lambda: client.post(f"/admin/jobs/{ids[3]}/cancel", headers=admin)),
        ("delete active", lambda: client.delete(f"/jobs/{ids[4]}", headers=ada)),
        ("delete ended", lambda: client.delete(f"/jobs/{ids[0]}", headers=ada)),
        ("duplicate name refused", lambda: _job(client, ada, "job-5")),
    ]
    for name, step in steps:
        step()
        counted, actual = _counted_and_actual(client, "ada@example.org")
        assert counted == actual, f"after {name}: counter {counted}, active jobs {actual}"
    assert _counted_and_actual(client, "ada@example.org") == (1, 1)


def test_racing_submissions_never_pass_the_limit(client: TestClient) -> None:
    """Submissions of one account at the same moment, each in its own transaction
    that stays open a while: exactly the limit's number get a slot."""
    signup(client, "ada@example.org")
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        user_id = session.scalars(select(User.id).where(User.email == "ada@example.org")).one()
    attempts = 8
    start = threading.Barrier(attempts)

    def submit() -> bool:
        start.wait()
        try:
            with unit_of_work(factory) as session:
                reserve_active_job(session, user_id, 3)
                time.sleep(0.05)  # the transaction stays open while the others try
        except ActiveJobLimitReached:
            return False
        return True

    with ThreadPoolExecutor(attempts) as pool:
        results = list(pool.map(lambda _: submit(), range(attempts)))
    assert sum(results) == 3
    with factory() as session:
        assert session.scalar(select(User.active_jobs).where(User.id == user_id)) == 3
