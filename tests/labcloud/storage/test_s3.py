"""S3Storage against moto's server: what only S3 storage does (the contract both
storages hold is in test_contract.py). Multipart uploads in parts with flat memory,
listings, renames and deletes past S3's 1,000-key pages, presigned requests used by
a plain HTTP client, and the start-up check of the bucket."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import socket
import time
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from labcloud.contract import SignedRequest
from labcloud.errors import NotFound
from labcloud.settings import FilesystemKind, ServiceSettings, load_settings
from labcloud.storage.base import CHUNK_SIZE, Entry, EntryType
from labcloud.storage.factory import make_storage
from labcloud.storage.s3 import (
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    BucketUnavailable,
    FolderUrlUnavailable,
    S3Storage,
    check_bucket,
    key_prefix,
    s3_client,
)
from labcloud.storage.zipstream import zip_stream
from tests.aws import MotoServer

BUCKET = "labcloud-files"
PREFIX = "labcloud/data/"
MiB = 1024 * 1024
PART = MIN_PART_SIZE  # the smallest part S3 takes, so that tests move few bytes


class Calls:
    """The parameters of every S3 request a client makes, by operation name."""

    def __init__(self, client: Any) -> None:
        self.params: dict[str, list[dict[str, Any]]] = {}
        client.meta.events.register("provide-client-params.s3.*", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.params.setdefault(model.name, []).append(dict(params))

    def of(self, operation: str) -> list[dict[str, Any]]:
        return self.params.get(operation, [])


@pytest.fixture
def client(aws: MotoServer) -> Any:
    aws.client("s3").create_bucket(Bucket=BUCKET)
    return s3_client()


@pytest.fixture
def calls(client: Any) -> Calls:
    return Calls(client)


@pytest.fixture
def storage(client: Any) -> S3Storage:
    return S3Storage(client, BUCKET, prefix=PREFIX, part_size=PART)


def names(aws: MotoServer) -> list[str]:
    """Every object name in the bucket."""
    paginator = aws.client("s3").get_paginator("list_objects_v2")
    return [
        item["Key"]
        for page in paginator.paginate(Bucket=BUCKET)
        for item in page.get("Contents", [])
    ]


def read(storage: S3Storage, key: str) -> bytes:
    with storage.open_read(key) as stream:
        return stream.read()


class Generated(io.RawIOBase):
    """``size`` bytes made up as they are read (never held whole), remembering the
    sizes asked for."""

    def __init__(self, size: int, fail_after: int | None = None) -> None:
        super().__init__()
        self.remaining = size
        self.served = 0
        self.fail_after = fail_after
        self.requests: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.requests.append(size)
        if self.fail_after is not None and self.served >= self.fail_after:
            raise OSError("client went away")
        count = min(self.remaining, size if size >= 0 else self.remaining)
        self.remaining -= count
        self.served += count
        return bytes([self.served % 251]) * count


@pytest.mark.parametrize(
    ("root", "prefix"),
    [
        ("./.labcloud/data", ".labcloud/data/"),
        ("/data/", "data/"),
        ("data//users/./", "data/users/"),
        ("", ""),
        (".", ""),
        ("/", ""),
    ],
)
def test_user_data_root_path_is_the_key_prefix(root: str, prefix: str) -> None:
    assert key_prefix(root) == prefix
    assert key_prefix(Path(root)) == prefix


def test_a_prefix_cannot_climb() -> None:
    with pytest.raises(ValueError, match=r"'\.\.' segment"):
        key_prefix("data/../other")


def test_objects_live_under_the_prefix_and_folders_are_markers(
    storage: S3Storage, aws: MotoServer
) -> None:
    storage.write("u1/data/a.txt", io.BytesIO(b"a"))
    storage.make_folder("u1/data/empty")
    assert names(aws) == [f"{PREFIX}u1/data/a.txt", f"{PREFIX}u1/data/empty/"]
    assert (
        aws.client("s3").head_object(Bucket=BUCKET, Key=f"{PREFIX}u1/data/empty/")["ContentLength"]
        == 0
    )
    # The marker is a folder, never a file named "".
    assert storage.list("u1/data") == [
        Entry("u1/data/a.txt", EntryType.FILE, 1),
        Entry("u1/data/empty", EntryType.DIRECTORY, 0),
    ]
    assert storage.stat("u1/data/empty") == Entry("u1/data/empty", EntryType.DIRECTORY, 0)
    assert list(storage.iter_files("u1")) == [Entry("u1/data/a.txt", EntryType.FILE, 1)]
    # An empty prefix is the top of the bucket.
    top = S3Storage(s3_client(), BUCKET, prefix="")
    assert top.stat("labcloud/data/u1/data/a.txt") == Entry(
        "labcloud/data/u1/data/a.txt", EntryType.FILE, 1
    )


def test_a_large_stream_is_uploaded_in_parts(
    storage: S3Storage, calls: Calls, aws: MotoServer
) -> None:
    size = 2 * PART + 3 * MiB + 7
    stream = Generated(size)
    entry = storage.write("u1/data/big.bin", stream)  # type: ignore[arg-type]
    assert entry == Entry("u1/data/big.bin", EntryType.FILE, size)
    assert [len(part["Body"]) for part in calls.of("UploadPart")] == [PART, PART, 3 * MiB + 7]
    assert len(calls.of("CompleteMultipartUpload")) == 1
    assert calls.of("PutObject") == []
    assert all(0 < request <= CHUNK_SIZE for request in stream.requests)
    etag = aws.client("s3").head_object(Bucket=BUCKET, Key=f"{PREFIX}u1/data/big.bin")["ETag"]
    assert etag.endswith('-3"')  # S3's mark of an object uploaded in three parts
    expected = Generated(size)
    with storage.open_read("u1/data/big.bin") as body:
        while chunk := body.read(CHUNK_SIZE):
            assert chunk == expected.read(len(chunk))
    assert expected.remaining == 0


def test_a_small_file_is_one_request(storage: S3Storage, calls: Calls) -> None:
    storage.write("u1/data/small.bin", Generated(PART - 1))  # type: ignore[arg-type]
    assert len(calls.of("PutObject")) == 1
    assert calls.of("CreateMultipartUpload") == []


def test_a_failed_upload_is_aborted_and_the_old_file_stays(
    storage: S3Storage, calls: Calls, aws: MotoServer
) -> None:
    storage.write("u1/data/a.bin", io.BytesIO(b"previous"))
    with pytest.raises(OSError, match="client went away"):
        storage.write("u1/data/a.bin", Generated(3 * PART, fail_after=PART + MiB))  # type: ignore[arg-type]
    assert len(calls.of("UploadPart")) == 1
    assert len(calls.of("AbortMultipartUpload")) == 1
    assert aws.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert read(storage, "u1/data/a.bin") == b"previous"


def test_memory_stays_flat_both_ways(storage: S3Storage) -> None:
    size = 48 * MiB
    tracemalloc.start()
    try:
        storage.write("u1/data/stream.bin", Generated(size))  # type: ignore[arg-type]
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = 0
        with storage.open_read("u1/data/stream.bin") as body:
            while chunk := body.read(CHUNK_SIZE):
                total += len(chunk)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    # About two parts (the one read, and botocore's while it sends); never 48 MiB.
    assert write_peak < 3 * PART, write_peak
    assert read_peak < 4 * CHUNK_SIZE, read_peak


def test_part_sizes_grow_to_stay_within_s3s_part_limit(client: Any) -> None:
    storage = S3Storage(client, BUCKET)
    assert storage._part_size_for(1) == DEFAULT_PART_SIZE
    assert storage._part_size_for(1000) == DEFAULT_PART_SIZE
    assert storage._part_size_for(1001) == 2 * DEFAULT_PART_SIZE
    assert storage._part_size_for(10_000) == 512 * DEFAULT_PART_SIZE
    # 10,000 parts hold more than S3's largest object (5 TiB).
    assert sum(storage._part_size_for(n) for n in range(1, 10_001)) > 5 * 1024**4


def _fill(aws: MotoServer, count: int) -> None:
    s3 = aws.client("s3")

    def put(index: int) -> None:
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}u1/data/many/f{index:05d}.txt", Body=b"xy")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, range(count)))


def test_listing_renaming_and_deleting_past_one_page(
    storage: S3Storage, calls: Calls, aws: MotoServer
) -> None:
    count = 1205
    _fill(aws, count)
    storage.write("u1/data/many/sub/inner.txt", io.BytesIO(b"i"))
    listed = storage.list("u1/data/many")
    assert len(listed) == count + 1
    assert listed[-1] == Entry("u1/data/many/sub", EntryType.DIRECTORY, 0)
    assert listed[0] == Entry("u1/data/many/f00000.txt", EntryType.FILE, 2)
    assert len(storage.list("u1/data/many", recursive=True)) == count + 2
    files = list(storage.iter_files("u1/data/many"))
    assert len(files) == count + 1
    assert [entry.key for entry in files] == sorted(entry.key for entry in files)
    assert len(calls.of("ListObjectsV2")) > 3  # every listing read two pages

    storage.move("u1/data/many", "u1/data/moved")
    assert storage.stat("u1/data/many") is None
    assert len(list(storage.iter_files("u1/data/moved"))) == count + 1
    deletes = calls.of("DeleteObjects")
    assert [len(d["Delete"]["Objects"]) for d in deletes] == [1000, count + 1 - 1000]

    storage.delete("u1/data/moved")
    assert storage.stat("u1/data/moved") is None
    assert names(aws) == [f"{PREFIX}u1/data/"]  # the folder that held it stays
    assert [len(d["Delete"]["Objects"]) for d in calls.of("DeleteObjects")[2:]] == [
        1000,
        count + 1 - 1000,
    ]


def test_a_large_object_is_moved_by_the_managed_copy(client: Any, calls: Calls) -> None:
    storage = S3Storage(
        client, BUCKET, prefix=PREFIX, part_size=PART, copy_threshold=PART, copy_part_size=PART
    )
    data = bytes(range(256)) * (6 * MiB // 256)
    storage.write("u1/data/large.bin", io.BytesIO(data))
    storage.write("u1/data/small.txt", io.BytesIO(b"s"))
    storage.move("u1/data", "u1/artifact/d")
    assert len(calls.of("UploadPartCopy")) == 2  # 6 MiB in 5 MiB parts
    assert len(calls.of("CopyObject")) == 1  # the small file
    assert read(storage, "u1/artifact/d/large.bin") == data


def test_unsafe_object_names_are_skipped(storage: S3Storage, aws: MotoServer) -> None:
    s3 = aws.client("s3")
    for name in ("u1/data/../escape.txt", "u1/data//double.txt", "u1/data/ok.txt"):
        s3.put_object(Bucket=BUCKET, Key=PREFIX + name, Body=b"x")
    assert [entry.key for entry in storage.list("u1/data", recursive=True)] == ["u1/data/ok.txt"]
    assert [entry.key for entry in storage.iter_files("u1/data")] == ["u1/data/ok.txt"]


def test_a_folder_zip_streams_from_s3_in_chunks(storage: S3Storage) -> None:
    storage.write("u1/data/run/a.bin", Generated(PART + MiB))  # type: ignore[arg-type]
    storage.write("u1/data/run/b.txt", io.BytesIO(b"text " * 10_000))
    reads: list[int] = []
    original = storage.open_read

    def recording_open_read(key: str) -> Any:
        body = original(key)
        read_body = body.read

        def recording_read(size: int = -1) -> bytes:
            reads.append(size)
            return read_body(size)

        body.read = recording_read  # type: ignore[method-assign]
        return body

    storage.open_read = recording_open_read  # type: ignore[method-assign]
    chunks = list(zip_stream(storage, "u1/data/run"))
    assert reads and all(0 < size <= CHUNK_SIZE for size in reads)
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as archive:
        assert archive.testzip() is None
        assert archive.read("b.txt") == b"text " * 10_000
        assert len(archive.read("a.bin")) == PART + MiB


def test_a_presigned_get_downloads_the_file(storage: S3Storage) -> None:
    storage.write("u1/data/r\u00e9sum\u00e9.txt", io.BytesIO(b"hello"))
    request = storage.download_request("u1/data/r\u00e9sum\u00e9.txt", expires_in=60)
    assert request.method == "GET"
    assert set(request.model_dump()) == {"method", "url", "headers", "data"}
    assert "X-Amz-Expires=60" in request.url
    response = httpx.request(**request.model_dump())
    assert response.status_code == 200
    assert response.content == b"hello"
    assert response.headers["content-disposition"] == (
        "attachment; filename*=utf-8''r%C3%A9sum%C3%A9.txt"
    )
    with pytest.raises(NotFound):
        storage.download_request("u1/data/none.txt", expires_in=60)
    storage.make_folder("u1/data/folder")
    with pytest.raises(FolderUrlUnavailable, match="is a folder") as refused:
        storage.download_request("u1/data/folder", expires_in=60)
    assert refused.value.status_code == 400


def policy(request: SignedRequest) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(base64.b64decode(request.data["policy"]))
    return document


def post(request: SignedRequest, filename: str, content: bytes) -> httpx.Response:
    """What a client does with an upload request: the form fields, then the file."""
    return httpx.post(
        request.url, data=request.data, files={"file": (filename, content)}, timeout=30
    )


def test_a_presigned_post_stores_exactly_its_key(storage: S3Storage) -> None:
    before = datetime.now(UTC)
    request = storage.upload_request("u1/data/in.txt", expires_in=600, max_bytes=1000)
    assert request.method == "POST"
    assert request.headers == {}
    assert request.data["key"] == f"{PREFIX}u1/data/in.txt"
    document = policy(request)
    assert {"key": f"{PREFIX}u1/data/in.txt"} in document["conditions"]
    assert {"bucket": BUCKET} in document["conditions"]
    assert ["content-length-range", 0, 1000] in document["conditions"]
    expires = datetime.fromisoformat(document["expiration"].replace("Z", "+00:00"))
    assert 590 <= (expires - before).total_seconds() <= 610
    response = post(request, "whatever.txt", b"uploaded")
    assert response.status_code == 204, response.text
    assert read(storage, "u1/data/in.txt") == b"uploaded"
    uncapped = storage.upload_request("u1/data/in.txt", expires_in=60, max_bytes=None)
    assert not [
        c
        for c in policy(uncapped)["conditions"]
        if isinstance(c, list) and c[0] == "content-length-range"
    ]


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def test_the_post_policy_is_signed_with_its_conditions(storage: S3Storage) -> None:
    """moto's server checks neither a POST's policy nor its signature (a too-large
    file, another key or an expired form are all stored): S3 does, so what can be
    checked here is that the signature covers the policy holding the conditions."""
    request = storage.upload_into_request("u1/data/in", expires_in=60, max_bytes=10)
    credential = request.data["x-amz-credential"]
    access_key, date, region, service, _ = credential.split("/")
    assert (access_key, region, service) == ("testing", "us-east-1", "s3")
    key = _hmac(b"AWS4testing", date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    expected = hmac.new(key, request.data["policy"].encode(), hashlib.sha256).hexdigest()
    assert request.data["x-amz-signature"] == expected
    assert ["content-length-range", 0, 10] in policy(request)["conditions"]


def test_a_presigned_post_into_a_folder_takes_the_files_name(storage: S3Storage) -> None:
    request = storage.upload_into_request("u1/output/job", expires_in=60, max_bytes=5000)
    assert request.data["key"] == f"{PREFIX}u1/output/job/${{filename}}"
    document = policy(request)
    assert ["starts-with", "$key", f"{PREFIX}u1/output/job/"] in document["conditions"]
    assert ["content-length-range", 0, 5000] in document["conditions"]
    assert not [c for c in document["conditions"] if isinstance(c, dict) and "key" in c]
    response = post(request, "result.csv", b"a,b\n1,2\n")
    assert response.status_code == 204, response.text
    assert storage.list("u1/output/job") == [Entry("u1/output/job/result.csv", EntryType.FILE, 8)]


def test_a_missing_bucket_is_named(aws: MotoServer) -> None:
    with pytest.raises(
        BucketUnavailable, match=r"^S3_BUCKET 'nowhere' cannot be used \(no such bucket\)$"
    ):
        check_bucket(s3_client(), "nowhere")


def test_an_unreachable_endpoint_is_named(aws: MotoServer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    started = time.monotonic()
    client = s3_client(endpoint_url=f"http://127.0.0.1:{closed_port}")
    with pytest.raises(BucketUnavailable, match=r"\(EndpointConnectionError\)$"):
        check_bucket(client, BUCKET)
    assert time.monotonic() - started < 30


def _env_file(tmp_path: Path, **settings: str) -> Path:
    path = tmp_path / "s3.env"
    lines = {"INTERNAL_API_KEY_SECRET": "a-real-secret-of-enough-length", **settings}
    path.write_text("".join(f"{name}={value}\n" for name, value in lines.items()))
    return path


def test_settings_refuse_a_bucket_that_cannot_be_used(aws: MotoServer, tmp_path: Path) -> None:
    env = _env_file(tmp_path, FILESYSTEM="s3", S3_BUCKET="nowhere")
    with pytest.raises(SystemExit) as stopped:
        load_settings(ServiceSettings, env)
    message = str(stopped.value.code)
    assert "S3_BUCKET: Value error, S3_BUCKET 'nowhere' cannot be used (no such bucket)" in message
    assert "Traceback" not in message
    env = _env_file(tmp_path, FILESYSTEM="s3")
    with pytest.raises(SystemExit, match="FILESYSTEM=s3 needs S3_BUCKET"):
        load_settings(ServiceSettings, env)


def test_settings_build_an_s3_storage(aws: MotoServer, tmp_path: Path) -> None:
    aws.client("s3").create_bucket(Bucket=BUCKET)
    env = _env_file(
        tmp_path,
        FILESYSTEM="s3",
        S3_BUCKET=BUCKET,
        S3_REGION="us-east-1",
        S3_ENDPOINT_URL=aws.endpoint_url,
        USER_DATA_ROOT_PATH="./tenants/lab",
    )
    settings = load_settings(ServiceSettings, env)
    assert settings.filesystem is FilesystemKind.S3
    assert settings.s3_endpoint_url == aws.endpoint_url
    storage = make_storage(settings)
    assert isinstance(storage, S3Storage)
    assert storage.prefix == "tenants/lab/"
    storage.write("u1/data/a.txt", io.BytesIO(b"a"))
    assert names(aws) == ["tenants/lab/u1/data/a.txt"]
    assert storage.local_path("u1/data/a.txt") is None
    # A bucket removed after the settings were read stops make_storage too.
    missing = settings.model_copy(update={"s3_bucket": "gone"})
    with pytest.raises(BucketUnavailable, match="S3_BUCKET 'gone'"):
        make_storage(missing)
