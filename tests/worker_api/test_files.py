"""The worker API's files routes over HTTP, lifespan included: inputs and results
of held jobs only, uploads into folders as DECODE's worker sends them, the storage's
transfer requests (local storage's signed URLs, redeemed at ``/_signed/{token}``:
once, while their owner is active, within the size they allow) and the owner's
storage limit, against a stand-in user API on loopback; the queue database on
SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from labcloud.db import create_db_engine
from labcloud.storage import LocalStorage
from labcloud.storage.local import STAGING_FOLDER
from tests.worker_api.conftest import (
    ClientFactory,
    FakeUserApi,
    app_clients,
    enqueue,
    pull,
)
from worker_api.files.service import LOG_ALLOWANCE_BYTES


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def queue_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh SQLite file, or the session's PostgreSQL queue database emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    url: str = request.getfixturevalue("queue_postgres_url")
    engine = create_db_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text("TRUNCATE queued_jobs, status_outbox, used_upload_tokens RESTART IDENTITY")
        )
    engine.dispose()
    return url


@pytest.fixture
def make_client(
    tmp_path: Path, fake_user_api: FakeUserApi, queue_db_url: str
) -> Iterator[ClientFactory]:
    """Start the app (lifespan included) with test settings and ``overrides``."""
    yield from app_clients(tmp_path, fake_user_api, queue_db_url=queue_db_url)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    return make_client()


def put_status(client: TestClient, queue_id: str, status: str, headers: dict[str, str]) -> int:
    return client.put(
        f"/jobs/{queue_id}/status", params={"status": status}, headers=headers
    ).status_code


@pytest.fixture
def held_job(client: TestClient, fake_user_api: FakeUserApi, tmp_path: Path) -> str:
    """A job leased to worker1 whose input ``u1/data/run/a.txt`` exists."""
    source = tmp_path / "data" / "u1" / "data" / "run" / "a.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"input bytes")
    (tmp_path / "data" / "u1" / "data" / "secret.txt").write_bytes(b"not yours")
    queue_id = str(enqueue(client, 1, files_down={"data/a.txt": "u1/data/run/a.txt"})["id"])
    assert list(pull(client, fake_user_api.headers())) == [queue_id]
    return queue_id


def test_download_inputs_of_held_jobs_only(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str
) -> None:
    worker = fake_user_api.headers()
    signed = client.get("/files/u1/data/run/a.txt/url", headers=worker)
    assert signed.status_code == 200
    request = signed.json()
    assert set(request) == {"method", "url", "headers", "data"}
    assert request["url"].startswith("http://testserver/_signed/")
    assert client.request(**request).content == b"input bytes"
    direct = client.get("/files/u1/data/run/a.txt/download", headers=worker)
    assert (direct.status_code, direct.content) == (200, b"input bytes")

    for uri in ("u1/data/secret.txt", "u1/data/run/../secret.txt", "u1/data/run"):
        assert client.get(f"/files/{uri}/url", headers=worker).status_code == 404, uri
        assert client.get(f"/files/{uri}/download", headers=worker).status_code == 404, uri
    other = fake_user_api.headers("worker2@example.org")
    assert client.get("/files/u1/data/run/a.txt/url", headers=other).status_code == 404
    assert client.get("/files/u1/data/run/a.txt/download", headers=other).status_code == 404

    tampered = request["url"][:-2] + ("AA" if not request["url"].endswith("AA") else "BB")
    assert client.get(tampered).status_code == 403
    assert client.post(request["url"], files={"file": ("a", b"x")}).status_code == 403

    assert put_status(client, held_job, "finished", worker) == 204
    assert client.get("/files/u1/data/run/a.txt/url", headers=worker).status_code == 404


def test_upload_results_of_held_jobs_only(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path
) -> None:
    worker = fake_user_api.headers()
    signed = client.post(
        f"/jobs/{held_job}/files/url",
        params={"type": "output", "base_path": "sub"},
        headers=worker,
    )
    assert signed.status_code == 201, signed.text
    request = signed.json()
    assert set(request) == {"method", "url", "headers", "data"}
    uploaded = client.request(**request, files={"file": ("result.txt", b"result")})
    assert uploaded.status_code == 201, uploaded.text
    assert (tmp_path / "data/u1/output/job1/sub/result.txt").read_bytes() == b"result"
    assert client.get(request["url"]).status_code == 403  # an upload URL does not download

    direct = client.post(
        f"/jobs/{held_job}/files/upload",
        params={"type": "log"},
        files={"file": ("run.log", b"log line\n")},
        headers=worker,
    )
    assert direct.status_code == 201, direct.text
    assert direct.json() == {
        "path": "run.log",
        "size": 9,
        "files": [{"path": "run.log", "size": 9}],
    }
    assert (tmp_path / "data/u1/log/job1/run.log").read_bytes() == b"log line\n"

    escape = client.post(
        f"/jobs/{held_job}/files/url",
        params={"type": "output", "base_path": "../../data/x"},
        headers=worker,
    )
    assert escape.status_code == 400
    assert (
        client.post(
            f"/jobs/{held_job}/files/url",
            params={"type": "config", "base_path": "x"},
            headers=worker,
        ).status_code
        == 422
    )
    missing_field = client.post(
        f"/jobs/{held_job}/files/upload",
        params={"type": "log", "base_path": "x"},
        files={"other": ("x", b"x")},
        headers=worker,
    )
    assert missing_field.status_code == 400

    other = fake_user_api.headers("worker2@example.org")
    for route in ("url", "upload"):
        response = client.post(
            f"/jobs/{held_job}/files/{route}",
            params={"type": "output", "base_path": "x"},
            files={"file": ("x", b"x")},
            headers=other,
        )
        assert response.status_code == 404, route
    assert not (tmp_path / "data/u1/output/job1/x").exists()


def _decode_worker_put_file(
    client: TestClient,
    queue_id: str,
    headers: dict[str, str],
    kind: str,
    path_api: str,
    body: bytes,
) -> Any:
    """Upload one result as DECODE's worker (v0.3.0, ``JobAPI.put_file``) does: one
    URL per file with ``base_path`` = the file's folder relative to the ``files_up``
    root, then the request it got, as keyword arguments, with the part named after
    the file."""
    folder, _, name = path_api.rpartition("/")
    response = client.post(
        f"/jobs/{queue_id}/files/url", params={"base_path": folder, "type": kind}, headers=headers
    )
    assert response.status_code == 201, response.text
    return client.request(**response.json(), files={"file": (name, body)})


def test_base_path_is_a_folder_as_decode_workers_upload(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path
) -> None:
    worker = fake_user_api.headers()
    results = {
        "emitter.h5": b"emitters",
        "model.pt": b"weights",
        "plots/loss.png": b"png",
        "plots/deep/er/trace.csv": b"1,2",
    }
    for path_api, body in results.items():
        answer = _decode_worker_put_file(client, held_job, worker, "output", path_api, body)
        assert answer.status_code == 201, answer.text
    stored = tmp_path / "data/u1/output/job1"
    assert {
        p.relative_to(stored).as_posix(): p.read_bytes() for p in stored.rglob("*") if p.is_file()
    } == results
    # The default base_path is the location itself; the direct route means the same.
    default = client.post(f"/jobs/{held_job}/files/url", params={"type": "log"}, headers=worker)
    assert default.status_code == 201, default.text
    assert client.request(**default.json(), files={"file": ("log.txt", b"l")}).status_code == 201
    direct = client.post(
        f"/jobs/{held_job}/files/upload",
        params={"type": "artifact", "base_path": "a/b"},
        files={"file": ("c.bin", b"c")},
        headers=worker,
    )
    assert direct.status_code == 201, direct.text
    assert direct.json()["path"] == "a/b/c.bin"
    assert (tmp_path / "data/u1/log/job1/log.txt").read_bytes() == b"l"
    assert (tmp_path / "data/u1/artifact/job1/a/b/c.bin").read_bytes() == b"c"


@pytest.mark.parametrize(
    "name", ["", "../escape.txt", "a\\b.txt", "bad\nname", ".labcloud-partial-x", "n" * 256]
)
def test_a_missing_or_unsafe_part_name_is_refused(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path, name: str
) -> None:
    worker = fake_user_api.headers()
    signed = client.post(f"/jobs/{held_job}/files/url", params={"type": "output"}, headers=worker)
    refused = client.request(**signed.json(), files={"file": (name, b"x")})
    assert refused.status_code in (400, 422), refused.text
    direct = client.post(
        f"/jobs/{held_job}/files/upload",
        params={"type": "output"},
        files={"file": (name, b"x")},
        headers=worker,
    )
    assert direct.status_code in (400, 422), direct.text
    assert not (tmp_path / "data/u1/output").exists()
    # A refused upload does not use the URL up.
    assert client.request(**signed.json(), files={"file": ("ok.txt", b"x")}).status_code == 201


def test_several_parts_in_one_upload_are_all_stored_or_all_refused(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path
) -> None:
    worker = fake_user_api.headers()
    parts = [("file", ("a.txt", b"A")), ("file", ("sub/b.txt", b"BB"))]
    direct = client.post(
        f"/jobs/{held_job}/files/upload",
        params={"type": "output", "base_path": "run"},
        files=parts,
        headers=worker,
    )
    assert direct.status_code == 201, direct.text
    assert direct.json() == {
        "path": "run",
        "size": 3,
        "files": [{"path": "run/a.txt", "size": 1}, {"path": "run/sub/b.txt", "size": 2}],
    }
    signed = client.post(f"/jobs/{held_job}/files/url", params={"type": "log"}, headers=worker)
    stored = client.request(**signed.json(), files=parts)
    assert stored.status_code == 201, stored.text
    assert (tmp_path / "data/u1/output/job1/run/sub/b.txt").read_bytes() == b"BB"
    assert (tmp_path / "data/u1/log/job1/a.txt").read_bytes() == b"A"
    assert (tmp_path / "data/u1/log/job1/sub/b.txt").read_bytes() == b"BB"

    for refused_parts in (
        [("file", ("c.txt", b"1")), ("file", ("c.txt", b"2"))],  # the same name twice
        [("file", ("d", b"1")), ("file", ("d/e.txt", b"2"))],  # a file and its folder
        [("file", ("f.txt", b"1")), ("file", ("", b"2"))],  # a part without a name
        [("file", (f"g{i}.txt", b"x")) for i in range(101)],  # over the bound
    ):
        refused = client.post(
            f"/jobs/{held_job}/files/upload",
            params={"type": "artifact"},
            files=refused_parts,
            headers=worker,
        )
        assert refused.status_code in (400, 422), refused.text
    assert not (tmp_path / "data/u1/artifact").exists()


def test_an_upload_url_is_good_for_one_upload(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path
) -> None:
    worker = fake_user_api.headers()
    signed = client.post(
        f"/jobs/{held_job}/files/url", params={"type": "output"}, headers=worker
    ).json()
    assert client.request(**signed, files={"file": ("r.txt", b"first")}).status_code == 201
    again = client.request(**signed, files={"file": ("r.txt", b"second")})
    assert again.status_code == 403
    assert "already been used" in again.json()["detail"]
    assert (tmp_path / "data/u1/output/job1/r.txt").read_bytes() == b"first"
    # Each URL asked for is a new one.
    fresh = client.post(f"/jobs/{held_job}/files/url", params={"type": "output"}, headers=worker)
    assert client.request(**fresh.json(), files={"file": ("r.txt", b"2nd")}).status_code == 201


def test_signed_urls_stop_working_when_their_owner_is_disabled(
    make_client: ClientFactory, fake_user_api: FakeUserApi, tmp_path: Path
) -> None:
    client = make_client(account_check_ttl_seconds=0)
    source = tmp_path / "data/u1/data/a.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"input")
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1, files_down={"data/a.txt": "u1/data/a.txt"})["id"])
    pull(client, worker)
    download = client.get("/files/u1/data/a.txt/url", headers=worker).json()
    upload = client.post(
        f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker
    ).json()
    assert client.request(**download).content == b"input"

    fake_user_api.accounts["u1"] = {"active": False, "max_storage_bytes": None}
    refused_download = client.request(**download)
    assert refused_download.status_code == 403
    assert "disabled" in refused_download.json()["detail"]
    refused_upload = client.request(**upload, files={"file": ("r.txt", b"x")})
    assert refused_upload.status_code == 403
    assert not (tmp_path / "data/u1/output").exists()


def test_results_count_against_the_owners_storage_limit(
    make_client: ClientFactory, fake_user_api: FakeUserApi, tmp_path: Path
) -> None:
    client = make_client(account_check_ttl_seconds=0)
    own = tmp_path / "data/u1/data/mine.bin"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"m" * 600)
    fake_user_api.accounts["u1"] = {"active": True, "max_storage_bytes": 1000}
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1)["id"])
    pull(client, worker)
    fits = client.post(f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker)
    assert client.request(**fits.json(), files={"file": ("a.bin", b"a" * 300)}).status_code == 201
    over = client.post(f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker)
    refused = client.request(**over.json(), files={"file": ("b.bin", b"b" * 300)})
    assert refused.status_code == 413
    assert "storage limit reached" in refused.json()["detail"]
    direct = client.post(
        f"/jobs/{queue_id}/files/upload",
        params={"type": "output"},
        files={"file": ("b.bin", b"b" * 300)},
        headers=worker,
    )
    assert direct.status_code == 413
    assert not (tmp_path / "data/u1/output/job1/b.bin").exists()
    # The log still fits (a small allowance beyond the limit), so the job can say why.
    log = client.post(f"/jobs/{queue_id}/files/url", params={"type": "log"}, headers=worker)
    assert client.request(**log.json(), files={"file": ("log.txt", b"l" * 500)}).status_code == 201
    # Once space is freed, the refused URL works: a refusal does not use it up.
    own.unlink()
    (tmp_path / "data/u1/log/job1/log.txt").unlink()
    assert client.request(**over.json(), files={"file": ("b.bin", b"b" * 300)}).status_code == 201


def test_an_upload_url_allows_at_most_the_owners_storage_limit(
    make_client: ClientFactory, fake_user_api: FakeUserApi, tmp_path: Path
) -> None:
    client = make_client(account_check_ttl_seconds=0)
    fake_user_api.accounts["u1"] = {"active": True, "max_storage_bytes": 1000}
    worker = fake_user_api.headers()
    queue_id = str(enqueue(client, 1)["id"])
    pull(client, worker)
    output = client.post(f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker)
    # More than the whole limit in one upload: refused by the URL itself, and kept usable.
    parts = [("file", ("a.bin", b"a" * 600)), ("file", ("b.bin", b"b" * 401))]
    refused = client.request(**output.json(), files=parts)
    assert refused.status_code == 413
    assert "1,000 bytes its upload URL allows" in refused.json()["detail"]
    assert not (tmp_path / "data/u1/output").exists()
    # Refused while the body arrived: nothing of it is left staged.
    assert list((tmp_path / "data" / STAGING_FOLDER).iterdir()) == []
    assert client.request(**output.json(), files=parts[:1]).status_code == 201
    # The log's URL allows the log's allowance beyond the limit.
    log = client.post(f"/jobs/{queue_id}/files/url", params={"type": "log"}, headers=worker)
    big_log = client.request(**log.json(), files={"file": ("log.txt", b"l" * 1500)})
    assert big_log.status_code == 201, big_log.text
    assert LOG_ALLOWANCE_BYTES > 1500


def test_signed_routes_answer_404_when_the_storage_signs_no_urls(
    client: TestClient, fake_user_api: FakeUserApi, held_job: str, tmp_path: Path
) -> None:
    worker = fake_user_api.headers()
    signed = client.get("/files/u1/data/run/a.txt/url", headers=worker).json()
    assert client.request(**signed).status_code == 200
    app: Any = client.app
    app.state.storage = LocalStorage(tmp_path / "data")
    assert client.request(**signed).status_code == 404
    upload = client.post(signed["url"], files={"file": ("a.txt", b"x")})
    assert upload.status_code == 404
