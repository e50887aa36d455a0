"""The user API's files routes with FILESYSTEM=s3, against moto's server: uploads
(one larger than a multipart part), listings, folders, renames, deletes, downloads
of files and zipped folders streamed from S3, and the presigned requests of the
``/url`` routes used by a plain HTTP client, as DECODE's clients use them."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from labcloud.settings import FilesystemKind
from labcloud.storage.s3 import DEFAULT_PART_SIZE, S3Storage
from tests.aws import MotoServer
from tests.user_api.helpers import signup
from user_api.app import create_app
from user_api.settings import UserApiSettings

BUCKET = "labcloud-user-files"
PREFIX = "lab/data/"


@pytest.fixture
def s3_client(aws: MotoServer, user_settings: UserApiSettings) -> Iterator[TestClient]:
    aws.client("s3").create_bucket(Bucket=BUCKET)
    settings = user_settings.model_copy(
        update={
            "filesystem": FilesystemKind.S3,
            "s3_bucket": BUCKET,
            "user_data_root_path": Path("./lab/data"),
        }
    )
    with TestClient(create_app(settings)) as client:
        yield client


def objects(aws: MotoServer) -> dict[str, dict[str, Any]]:
    """Every object in the bucket by name, with its listing fields."""
    paginator = aws.client("s3").get_paginator("list_objects_v2")
    return {
        item["Key"]: item
        for page in paginator.paginate(Bucket=BUCKET)
        for item in page.get("Contents", [])
    }


def paths(client: TestClient, headers: dict[str, str], path: str, **query: Any) -> list[str]:
    response = client.get(f"/files/{path}", headers=headers, params=query)
    assert response.status_code == 200, response.text
    return [entry["path"] for entry in response.json()]


def test_the_files_routes_on_s3(s3_client: TestClient, aws: MotoServer) -> None:
    client = s3_client
    user = signup(client, "ada@example.org")
    subject_prefix = _subject_prefix(aws, client, user)

    # An upload larger than one multipart part, and a small one beside it.
    big = bytes(range(256)) * ((DEFAULT_PART_SIZE + 3 * 1024 * 1024) // 256)
    response = client.post(
        "/files/data/run1/upload",
        headers=user,
        files=[("file", ("frames.bin", big)), ("file", ("notes.txt", b"first run\n"))],
    )
    assert response.status_code == 201, response.text
    stored = objects(aws)
    assert stored[f"{subject_prefix}data/run1/frames.bin"]["Size"] == len(big)
    assert stored[f"{subject_prefix}data/run1/frames.bin"]["ETag"].endswith('-2"')
    assert paths(client, user, "data/run1") == ["data/run1/frames.bin", "data/run1/notes.txt"]
    listed = client.get("/files/data/run1", headers=user).json()
    assert listed[0]["size_bytes"] == len(big)
    assert listed[0]["type"] == "file"

    # A folder, renames of a file and of an empty folder.
    assert client.post("/files/data/empty/", headers=user).status_code == 201
    assert paths(client, user, "data") == ["data/empty/", "data/run1/"]
    renamed = client.put("/files/data/run1/notes.txt", headers=user, json={"path": "data/n.txt"})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["path"] == "data/n.txt"
    renamed = client.put("/files/data/empty", headers=user, json={"path": "config/fresh"})
    assert renamed.status_code == 200, renamed.text
    assert paths(client, user, "config") == ["config/fresh/"]
    refused = client.put("/files/data/run1", headers=user, json={"path": "data/run2"})
    assert refused.status_code == 405  # not empty: the contract allows files and empty folders

    # Downloads: a file, streamed from S3, and a folder as a zip.
    download = client.get("/files/data/run1/frames.bin/download", headers=user)
    assert download.status_code == 200
    assert download.content == big
    assert download.headers["content-length"] == str(len(big))
    archive = client.get("/files/data/download", headers=user)
    assert archive.status_code == 200
    assert archive.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
        assert zipped.testzip() is None
        assert sorted(zipped.namelist()) == ["n.txt", "run1/frames.bin"]
        assert zipped.read("run1/frames.bin") == big

    # GET /files/{path}/url: a presigned GET any HTTP client can use.
    signed = client.get("/files/data/n.txt/url", headers=user)
    assert signed.status_code == 200, signed.text
    request = signed.json()
    assert set(request) == {"method", "url", "headers", "data"}
    assert request["method"] == "GET"
    assert request["url"].startswith(f"{aws.endpoint_url}/{BUCKET}/{subject_prefix}data/n.txt?")
    fetched = httpx.request(**request)
    assert fetched.status_code == 200
    assert fetched.content == b"first run\n"
    folder_url = client.get("/files/data/run1/url", headers=user)
    assert folder_url.status_code == 400
    assert "is a folder" in folder_url.json()["detail"]

    # POST /files/{type}/{path}/url: a presigned POST into the folder.
    signed = client.post("/files/data/inbox/url", headers=user)
    assert signed.status_code == 201, signed.text
    request = signed.json()
    assert request["method"] == "POST"
    assert request["data"]["key"] == f"{subject_prefix}data/inbox/${{filename}}"
    policy = json.loads(base64.b64decode(request["data"]["policy"]))
    assert ["starts-with", "$key", f"{subject_prefix}data/inbox/"] in policy["conditions"]
    assert [
        condition
        for condition in policy["conditions"]
        if isinstance(condition, list) and condition[0] == "content-length-range"
    ], "the upload is capped at the user's storage limit"
    posted = httpx.post(
        request["url"], data=request["data"], files={"file": ("sample.csv", b"a,b\n1,2\n")}
    )
    assert posted.status_code == 204, posted.text
    assert paths(client, user, "data/inbox") == ["data/inbox/sample.csv"]

    # Deletes: a folder with everything in it, then a file.
    assert client.delete("/files/data/run1", headers=user).status_code == 204
    assert client.get("/files/data/run1", headers=user).status_code == 404
    assert client.delete("/files/data/n.txt", headers=user).status_code == 204
    assert paths(client, user, "data") == ["data/inbox/"]
    assert not [name for name in objects(aws) if "/run1/" in name]


def _subject_prefix(aws: MotoServer, client: TestClient, user: dict[str, str]) -> str:
    """The object-name prefix of the user's files (the prefix, then the user's id),
    found from a first upload."""
    response = client.post(
        "/files/config/upload", headers=user, files={"file": ("probe.txt", b"probe")}
    )
    assert response.status_code == 201, response.text
    [name] = [name for name in objects(aws) if name.endswith("/config/probe.txt")]
    assert name.startswith(PREFIX)
    assert client.delete("/files/config/probe.txt", headers=user).status_code == 204
    return name.removesuffix("config/probe.txt")


def test_the_app_builds_s3_storage(s3_client: TestClient) -> None:
    storage = s3_client.app.state.storage  # type: ignore[attr-defined]
    assert isinstance(storage, S3Storage)
    assert storage.prefix == PREFIX
