"""The worker API's files routes on S3 (moto's server): a worker gets presigned
requests only for the inputs and result folders of jobs it holds, uploads land at
``<folder>/${filename}``, and an upload URL's policy allows at most what the
owner's storage limit leaves (plus the log's allowance). moto checks neither the
signature nor the policy of a presigned request; the policy's conditions are read
back instead (tests/labcloud/storage/test_s3.py checks that the signature covers
them)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.aws import MotoServer
from tests.worker_api.conftest import ClientFactory, FakeUserApi, app_clients, enqueue, pull
from worker_api.files.service import LOG_ALLOWANCE_BYTES

BUCKET = "labcloud-worker-files"
PREFIX = "users"


@pytest.fixture
def bucket(aws: MotoServer) -> Any:
    s3 = aws.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/u1/data/run/a.txt", Body=b"input bytes")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/u1/data/secret.txt", Body=b"not yours")
    return s3


@pytest.fixture
def make_client(
    tmp_path: Path, fake_user_api: FakeUserApi, bucket: Any, aws: MotoServer
) -> Iterator[ClientFactory]:
    yield from app_clients(
        tmp_path,
        fake_user_api,
        filesystem="s3",
        s3_bucket=BUCKET,
        s3_region=aws.region,
        s3_endpoint_url=aws.endpoint_url,
        user_data_root_path=PREFIX,
    )


@pytest.fixture
def held_job(make_client: ClientFactory, fake_user_api: FakeUserApi) -> tuple[TestClient, str]:
    client = make_client(account_check_ttl_seconds=0)
    queue_id = str(enqueue(client, 1, files_down={"data/a.txt": "u1/data/run/a.txt"})["id"])
    assert list(pull(client, fake_user_api.headers())) == [queue_id]
    return client, queue_id


def conditions(request: dict[str, Any]) -> list[Any]:
    policy = json.loads(base64.b64decode(request["data"]["policy"]))
    return list(policy["conditions"])


def test_inputs_of_held_jobs_only(
    held_job: tuple[TestClient, str], fake_user_api: FakeUserApi, aws: MotoServer
) -> None:
    client, queue_id = held_job
    worker = fake_user_api.headers()
    signed = client.get("/files/u1/data/run/a.txt/url", headers=worker)
    assert signed.status_code == 200, signed.text
    request = signed.json()
    assert request["method"] == "GET"
    assert request["url"].startswith(f"{aws.endpoint_url}/{BUCKET}/{PREFIX}/u1/data/run/a.txt?")
    assert "X-Amz-Signature=" in request["url"]
    assert httpx.get(request["url"]).content == b"input bytes"

    for uri in ("u1/data/secret.txt", "u1/data/run/../secret.txt", "u1/data/run"):
        assert client.get(f"/files/{uri}/url", headers=worker).status_code == 404, uri
    other = fake_user_api.headers("worker2@example.org")
    assert client.get("/files/u1/data/run/a.txt/url", headers=other).status_code == 404
    finished = client.put(f"/jobs/{queue_id}/status", params={"status": "finished"}, headers=worker)
    assert finished.status_code == 204
    assert client.get("/files/u1/data/run/a.txt/url", headers=worker).status_code == 404


def test_result_folders_of_held_jobs_only(
    held_job: tuple[TestClient, str], fake_user_api: FakeUserApi, bucket: Any
) -> None:
    client, queue_id = held_job
    worker = fake_user_api.headers()
    other = fake_user_api.headers("worker2@example.org")
    refused = client.post(f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=other)
    assert refused.status_code == 404
    signed = client.post(
        f"/jobs/{queue_id}/files/url",
        params={"type": "output", "base_path": "sub"},
        headers=worker,
    )
    assert signed.status_code == 201, signed.text
    request = signed.json()
    folder = f"{PREFIX}/u1/output/job1/sub/"
    assert request["method"] == "POST"
    assert request["data"]["key"] == folder + "${filename}"
    assert ["starts-with", "$key", folder] in conditions(request)
    # Form fields first, the file last, as S3 wants them (and the runner sends them).
    posted = httpx.post(
        request["url"], data=request["data"], files={"file": ("result.txt", b"result")}
    )
    assert posted.status_code in (200, 201, 204), posted.text
    stored = bucket.get_object(Bucket=BUCKET, Key=folder + "result.txt")["Body"].read()
    assert stored == b"result"
    escape = client.post(
        f"/jobs/{queue_id}/files/url",
        params={"type": "output", "base_path": "../../data"},
        headers=worker,
    )
    assert escape.status_code in (400, 404, 422), escape.text


def test_an_upload_url_allows_what_the_owners_limit_leaves(
    held_job: tuple[TestClient, str], fake_user_api: FakeUserApi
) -> None:
    client, queue_id = held_job
    fake_user_api.accounts["u1"] = {
        "active": True,
        "max_storage_bytes": 1000,
        "bytes_used": 600,
        "remaining_storage_bytes": 400,
    }
    worker = fake_user_api.headers()
    output = client.post(f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker)
    assert output.status_code == 201, output.text
    assert ["content-length-range", 0, 400] in conditions(output.json())
    log = client.post(f"/jobs/{queue_id}/files/url", params={"type": "log"}, headers=worker)
    assert log.status_code == 201, log.text
    assert ["content-length-range", 0, 400 + LOG_ALLOWANCE_BYTES] in conditions(log.json())

    fake_user_api.accounts["u1"] = {
        "active": True,
        "max_storage_bytes": 1000,
        "bytes_used": 1000,
        "remaining_storage_bytes": 0,
    }
    full = client.post(f"/jobs/{queue_id}/files/url", params={"type": "output"}, headers=worker)
    assert full.status_code == 413, full.text
