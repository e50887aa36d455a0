"""Receiving an upload's multipart body into staged files (``received_files``) and
storing them by rename (``LocalStorage.write`` of a ``StagedFile``), on a real
temporary folder, with the body arriving in chunks of every size."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from starlette.requests import Request
from starlette.types import Message

from labcloud.errors import LabCloudError, PayloadTooLarge
from labcloud.storage.base import Entry
from labcloud.storage.http import UPLOAD_WRITE_SIZE, UploadLimit, received_files
from labcloud.storage.local import STAGING_FOLDER, LocalStorage, StagedFile
from labcloud.storage.uploads import MAX_UPLOAD_PARTS, UploadRefused

BOUNDARY = "bench-boundary-7f3a"


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    root = tmp_path / "root"
    root.mkdir()
    return LocalStorage(root)


def multipart(parts: Sequence[tuple[str, str | None, bytes]], *, close: bool = True) -> bytes:
    """A multipart/form-data body of (field, file name or None, content) parts."""
    body = bytearray()
    for field, filename, content in parts:
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        body += b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
    if close:
        body += f"--{BOUNDARY}--\r\n".encode()
    return bytes(body)


def request(body: bytes, chunk: int, content_type: str | None = None) -> Request:
    """A request whose body arrives in ``chunk``-byte messages, as a server sends it."""
    pieces = [body[offset : offset + chunk] for offset in range(0, len(body), chunk)] or [b""]
    messages: list[Message] = [
        {"type": "http.request", "body": piece, "more_body": index < len(pieces) - 1}
        for index, piece in enumerate(pieces)
    ]

    async def receive() -> Message:
        return messages.pop(0)

    kind = content_type or f"multipart/form-data; boundary={BOUNDARY}"
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "headers": [(b"content-type", kind.encode())],
    }
    return Request(scope, receive)


def staged(storage: LocalStorage) -> list[str]:
    folder = storage.root / STAGING_FOLDER
    return sorted(os.listdir(folder)) if folder.exists() else []


def receive_and_store(
    storage: LocalStorage, body: bytes, chunk: int, *, limit: UploadLimit | None = None
) -> list[Entry]:
    """Receive ``body`` and write each file part to ``u1/data/<its file name>``."""

    async def run() -> list[Entry]:
        async with received_files(request(body, chunk), storage, limit=limit) as parts:
            for part in parts:
                assert isinstance(part.stream, StagedFile)
                assert part.stream.tell() == 0
            return [storage.write(f"u1/data/{part.filename}", part.stream) for part in parts]

    return anyio.run(run)


@pytest.mark.parametrize("chunk", [1, 7, 100, 64 * 1024])
def test_parts_arrive_whole_whatever_the_chunks(storage: LocalStorage, chunk: int) -> None:
    parts = [
        ("file", "a.txt", b"first file\r\n--not-the-boundary"),
        ("note", None, b"a form field, ignored"),
        ("file", "b.bin", bytes(range(256)) * 3),
        ("file", "empty", b""),
    ]
    entries = receive_and_store(storage, multipart(parts), chunk)
    assert [entry.key for entry in entries] == ["u1/data/a.txt", "u1/data/b.bin", "u1/data/empty"]
    assert (storage.root / "u1/data/a.txt").read_bytes() == parts[0][2]
    assert (storage.root / "u1/data/b.bin").read_bytes() == parts[2][2]
    assert (storage.root / "u1/data/empty").read_bytes() == b""
    assert staged(storage) == []


def test_a_large_part_is_written_in_large_writes_and_renamed(storage: LocalStorage) -> None:
    content = os.urandom(2 * UPLOAD_WRITE_SIZE + 12345)
    (entry,) = receive_and_store(storage, multipart([("file", "big.bin", content)]), 64 * 1024)
    path = storage.root / "u1/data/big.bin"
    assert entry.size == len(content)
    assert path.read_bytes() == content
    assert path.stat().st_mode & 0o777 == 0o644
    assert staged(storage) == []


def test_files_over_the_limit_are_refused_while_they_arrive(storage: LocalStorage) -> None:
    seen: list[int] = []

    def refusal(received: int) -> LabCloudError:
        seen.append(received)
        return PayloadTooLarge("too large")

    body = multipart([("file", "a.bin", b"a" * 600), ("file", "b.bin", b"b" * 600)])
    with pytest.raises(PayloadTooLarge):
        receive_and_store(storage, body, 100, limit=UploadLimit(1000, refusal))
    # Refused at the chunk that passed the limit, before the body's end.
    assert seen and 1000 < seen[0] <= 1100
    assert staged(storage) == []
    assert not (storage.root / "u1").exists()


def test_files_at_the_limit_are_kept(storage: LocalStorage) -> None:
    limit = UploadLimit(1000, lambda received: PayloadTooLarge(str(received)))
    body = multipart([("file", "a.bin", b"a" * 400), ("file", "b.bin", b"b" * 600)])
    assert len(receive_and_store(storage, body, 100, limit=limit)) == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (multipart([("file", "a.txt", b"x" * 1000)], close=False), "ends before"),
        (multipart([("file", "a.txt", b"x" * 1000)])[:-30], "ends before"),
        (multipart([("file", None, b"not a file")]), "must carry files"),
        (multipart([("other", "a.txt", b"x")]), "send the file"),
        (multipart([("file", f"{n}.txt", b"x") for n in range(MAX_UPLOAD_PARTS + 1)]), "at most"),
        (multipart([("note", None, b"x" * 70_000), ("file", "a", b"x")]), "over 65,536 bytes"),
        (b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: form-data\r\n\r\nx\r\n", "no name"),
        (b"this is not multipart at all" * 10, "malformed"),
    ],
)
def test_a_bad_body_is_refused_and_leaves_nothing(
    storage: LocalStorage, body: bytes, message: str
) -> None:
    with pytest.raises(UploadRefused, match=message):
        receive_and_store(storage, body, 512)
    assert staged(storage) == []
    assert not (storage.root / "u1").exists()


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data"])
def test_a_body_that_is_not_a_multipart_form_is_refused(
    storage: LocalStorage, content_type: str
) -> None:
    async def run() -> None:
        async with received_files(request(b"{}", 10, content_type), storage):
            raise AssertionError("nothing to receive")

    with pytest.raises(UploadRefused, match="multipart/form-data"):
        anyio.run(run)


def test_a_failure_while_storing_removes_what_was_received(storage: LocalStorage) -> None:
    async def run() -> None:
        body = multipart([("file", "a.txt", b"x" * 5000)])
        async with received_files(request(body, 1000), storage):
            assert len(staged(storage)) == 1
            raise LookupError("the store failed")

    with pytest.raises(LookupError):
        anyio.run(run)
    assert staged(storage) == []


def test_a_staged_file_replaces_the_file_at_its_key(storage: LocalStorage) -> None:
    storage.write("u1/data/a.txt", io.BytesIO(b"old"))
    staged_file = storage.staging_file()
    staged_file.write(b"new content")
    staged_file.seek(0)
    entry = storage.write("u1/data/a.txt", staged_file)
    assert entry.size == len(b"new content")
    assert (storage.root / "u1/data/a.txt").read_bytes() == b"new content"
    assert not staged_file.path.exists()
    staged_file.discard()
    assert (storage.root / "u1/data/a.txt").read_bytes() == b"new content"
    assert storage.list("u1/data") == [entry]


def test_a_staged_file_of_another_storage_is_copied(storage: LocalStorage, tmp_path: Path) -> None:
    other_root = tmp_path / "other"
    other_root.mkdir()
    staged_file = LocalStorage(other_root).staging_file()
    staged_file.write(b"copied")
    staged_file.seek(0)
    storage.write("u1/data/a.txt", staged_file)
    assert (storage.root / "u1/data/a.txt").read_bytes() == b"copied"
    assert staged_file.path.exists()
    staged_file.discard()
    assert not staged_file.path.exists()


def test_staged_files_left_by_a_stopped_process_are_removed(storage: LocalStorage) -> None:
    folder = storage.root / STAGING_FOLDER
    folder.mkdir()
    old, recent = folder / ".labcloud-partial-old", folder / ".labcloud-partial-recent"
    old.write_bytes(b"left over")
    recent.write_bytes(b"another process is receiving this")
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    storage.staging_file().discard()
    assert not old.exists()
    assert recent.exists()
