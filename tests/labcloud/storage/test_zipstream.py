"""Folders stream out as ZIP archives with flat memory; the HTTP helpers around it."""

from __future__ import annotations

import io
import os
import subprocess
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import httpx
import pytest
from fastapi import FastAPI
from starlette.responses import Response

from labcloud.errors import LabCloudError, NotFound
from labcloud.storage import zipstream
from labcloud.storage.http import content_disposition, download_response
from labcloud.storage.local import LocalStorage
from labcloud.storage.zipstream import zip_stream
from labcloud.web import install_error_handlers


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path)


def put(storage: LocalStorage, key: str, data: bytes) -> None:
    storage.write(key, io.BytesIO(data))


def unzip(chunks: Iterator[bytes]) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def test_zip_has_relative_names_and_contents(storage: LocalStorage) -> None:
    files = {
        "u1/output/job/a.txt": b"alpha" * 100,
        "u1/output/job/sub/b.bin": os.urandom(3000),
        "u1/output/job/sub/deeper/c.txt": b"",
        "u1/output/other.txt": b"not in the folder",
    }
    for key, data in files.items():
        put(storage, key, data)
    storage.make_folder("u1/output/job/empty")
    assert unzip(zip_stream(storage, "u1/output/job")) == {
        "a.txt": files["u1/output/job/a.txt"],
        "sub/b.bin": files["u1/output/job/sub/b.bin"],
        "sub/deeper/c.txt": b"",
    }


def test_empty_or_missing_folder_is_an_empty_archive(storage: LocalStorage) -> None:
    storage.make_folder("u1/data/empty")
    assert unzip(zip_stream(storage, "u1/data/empty")) == {}
    assert unzip(zip_stream(storage, "u1/data/none")) == {}


class CountingReader(io.RawIOBase):
    """Passes reads through, adding their sizes to its storage's count."""

    def __init__(self, inner: BinaryIO, storage: CountingStorage) -> None:
        super().__init__()
        self.inner = inner
        self.storage = storage

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.inner.read(len(view))
        view[: len(data)] = data
        self.storage.bytes_read += len(data)
        return len(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


class CountingStorage(LocalStorage):
    """Counts the bytes read from files so far."""

    bytes_read = 0

    def open_read(self, key: str) -> BinaryIO:
        return io.BufferedReader(CountingReader(super().open_read(key), self))


def test_memory_stays_flat(tmp_path: Path) -> None:
    storage = CountingStorage(tmp_path)
    chunk_size = 64 * 1024
    total = 0
    for index in range(4):
        data = os.urandom(1_500_000)  # incompressible: output as large as input
        total += len(data)
        put(storage, f"u1/data/big/{index}.bin", data)
    storage.bytes_read = 0
    stream = zip_stream(storage, "u1/data/big", chunk_size=chunk_size)
    first = next(stream)
    # The first bytes leave long before the folder has been read.
    assert storage.bytes_read <= 2 * chunk_size
    sizes = [len(first)] + [len(chunk) for chunk in stream]
    assert storage.bytes_read == total
    assert sum(sizes) > total
    assert max(sizes) <= 2 * chunk_size + 1024
    assert len(sizes) > total // (2 * chunk_size)


def test_large_entries_use_zip64(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zipstream, "ZIP64_THRESHOLD", 0)
    put(storage, "u1/data/f/a.bin", b"a" * 5000)
    archive_bytes = b"".join(zip_stream(storage, "u1/data/f"))
    with zipfile.ZipFile(io.BytesIO(archive_bytes)) as archive:
        assert archive.read("a.bin") == b"a" * 5000
    # The ZIP64 extra field (header id 0x0001) is present in the local header.
    assert b"\x01\x00" in archive_bytes[30:60]


def _unzip_test(tmp_path: Path, archive_bytes: bytes) -> str:
    """What Info-ZIP's ``unzip -t`` says of the archive (it reads the central
    directory, as desktop tools do); fails unless every entry's CRC checks out."""
    path = tmp_path / "archive.zip"
    path.write_bytes(archive_bytes)
    result = subprocess.run(
        ["unzip", "-t", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_incompressible_files_are_stored_and_text_is_deflated(
    storage: LocalStorage, tmp_path: Path
) -> None:
    frames = os.urandom(3 * 1024 * 1024)  # like camera frames or compressed images
    text = b"".join(b"%d,%d,%.3f\n" % (i, i * 7, i / 3) for i in range(100_000))
    put(storage, "u1/data/run/frames.bin", frames)
    put(storage, "u1/data/run/table.csv", text)
    put(storage, "u1/data/run/tiny.txt", b"ok")
    put(storage, "u1/data/run/empty", b"")
    archive_bytes = b"".join(zip_stream(storage, "u1/data/run"))
    with zipfile.ZipFile(io.BytesIO(archive_bytes)) as archive:
        assert archive.testzip() is None
        kinds = {info.filename: info.compress_type for info in archive.infolist()}
        assert archive.read("frames.bin") == frames
        assert archive.read("table.csv") == text
        assert archive.read("tiny.txt") == b"ok"
        csv_size = archive.getinfo("table.csv").compress_size
    assert kinds == {
        "frames.bin": zipfile.ZIP_STORED,
        "table.csv": zipfile.ZIP_DEFLATED,
        "tiny.txt": zipfile.ZIP_STORED,  # two bytes do not shrink
        "empty": zipfile.ZIP_STORED,
    }
    assert csv_size < len(text) // 2
    # Stored data costs only the headers: the archive is not larger than its files
    # by more than a few hundred bytes each.
    assert len(archive_bytes) - len(frames) - csv_size - 2 < 4 * 200
    assert "No errors detected" in _unzip_test(tmp_path, archive_bytes)


def test_deflate_level_is_the_fast_one(storage: LocalStorage) -> None:
    text = b"".join(b"line %d of a log, status ok\n" % i for i in range(50_000))
    put(storage, "u1/log/job/log.txt", text)
    archive_bytes = b"".join(zip_stream(storage, "u1/log/job"))
    with zipfile.ZipFile(io.BytesIO(archive_bytes)) as archive:
        size = archive.getinfo("log.txt").compress_size
    fast = zlib.compressobj(zipstream.COMPRESS_LEVEL, zlib.DEFLATED, -15)
    assert size == len(fast.compress(text) + fast.flush())


def test_compression_is_decided_from_the_sample() -> None:
    assert zipstream.compression_for(b"") == zipfile.ZIP_STORED
    assert zipstream.compression_for(os.urandom(65536)) == zipfile.ZIP_STORED
    assert zipstream.compression_for(b"abc" * 20000) == zipfile.ZIP_DEFLATED
    # Half random, half zeros: shrinks by far more than a tenth.
    assert zipstream.compression_for(os.urandom(30000) + bytes(30000)) == zipfile.ZIP_DEFLATED


def test_stored_entries_use_zip64_and_stay_valid(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(zipstream, "ZIP64_THRESHOLD", 0)
    data = os.urandom(200_000)
    put(storage, "u1/data/f/a.bin", data)
    put(storage, "u1/data/f/b.txt", b"b" * 100_000)
    archive_bytes = b"".join(zip_stream(storage, "u1/data/f", chunk_size=16 * 1024))
    with zipfile.ZipFile(io.BytesIO(archive_bytes)) as archive:
        assert archive.getinfo("a.bin").compress_type == zipfile.ZIP_STORED
        assert archive.read("a.bin") == data
        assert archive.read("b.txt") == b"b" * 100_000
    assert b"\x01\x00" in archive_bytes[30:60]
    _unzip_test(tmp_path, archive_bytes)


def test_many_small_files_stream_out_as_they_are_read(tmp_path: Path) -> None:
    storage = CountingStorage(tmp_path)
    for index in range(64):
        put(storage, f"u1/data/small/{index:02}.bin", os.urandom(8 * 1024))
    storage.bytes_read = 0
    chunk_size = 64 * 1024
    stream = zip_stream(storage, "u1/data/small", chunk_size=chunk_size)
    next(stream)
    assert storage.bytes_read <= 2 * chunk_size
    assert max(len(chunk) for chunk in stream) <= 2 * chunk_size


def test_vanished_files_are_skipped(storage: LocalStorage) -> None:
    put(storage, "u1/data/f/a.txt", b"a")
    put(storage, "u1/data/f/b.txt", b"b")

    class Vanishing(LocalStorage):
        def open_read(self, key: str) -> BinaryIO:
            if key.endswith("a.txt"):
                raise NotFound("gone")
            return super().open_read(key)

    assert unzip(zip_stream(Vanishing(storage.root), "u1/data/f")) == {"b.txt": b"b"}


# -- HTTP helpers -------------------------------------------------------------------


class RemoteLike(LocalStorage):
    """Local storage pretending to have no local paths (as S3 would)."""

    def local_path(self, key: str) -> Path | None:
        return None


class Client:
    """Requests to an ASGI app in this thread, without a server."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.request(method, url, **kwargs)  # type: ignore[arg-type]

        return anyio.run(send)

    def get(self, url: str) -> httpx.Response:
        return self.request("GET", url)


def make_client(storage: LocalStorage) -> Client:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/get/{key:path}")
    def get(key: str) -> Response:
        return download_response(storage, key)

    return Client(app)


@pytest.mark.parametrize("kind", [LocalStorage, RemoteLike])
def test_download_response(tmp_path: Path, kind: type[LocalStorage]) -> None:
    storage = kind(tmp_path)
    put(storage, "u1/data/run/ä b.txt", b"hello")
    put(storage, "u1/data/run/plain.txt", b"plain")
    client = make_client(storage)
    response = client.get("/get/u1/data/run/ä b.txt")
    assert response.status_code == 200
    assert response.content == b"hello"
    assert response.headers["content-disposition"] == "attachment; filename*=utf-8''%C3%A4%20b.txt"
    assert response.headers["content-type"].startswith("text/plain")
    response = client.get("/get/u1/data/run/plain.txt")
    assert response.headers["content-disposition"] == 'attachment; filename="plain.txt"'
    assert response.headers["content-length"] == "5"
    folder = client.get("/get/u1/data/run")
    assert folder.status_code == 200
    assert folder.headers["content-type"] == "application/zip"
    assert folder.headers["content-disposition"] == 'attachment; filename="run.zip"'
    assert unzip(iter([folder.content])) == {"ä b.txt": b"hello", "plain.txt": b"plain"}
    missing = client.get("/get/u1/data/none")
    assert missing.status_code == 404


def test_download_response_filename_override(storage: LocalStorage) -> None:
    put(storage, "u1/data/x.txt", b"x")
    response = download_response(storage, "u1/data/x.txt", filename="other.txt")
    assert response.headers["content-disposition"] == 'attachment; filename="other.txt"'
    with pytest.raises(LabCloudError):
        download_response(storage, "u1/data/none")


def test_content_disposition_quotes_odd_names() -> None:
    assert content_disposition('a"b.txt') == "attachment; filename*=utf-8''a%22b.txt"
