"""The ``Storage`` contract, held by both implementations: a local folder, and an S3
bucket on moto's server. What only one of them does (symbolic links, multipart
uploads, presigned requests) is tested in test_local.py and test_s3.py."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest

from labcloud.errors import BadRequest, Conflict, NotFound
from labcloud.storage.base import CHUNK_SIZE, Entry, EntryType, Storage
from labcloud.storage.local import LocalStorage
from labcloud.storage.paths import UnsafePath
from labcloud.storage.s3 import S3Storage, s3_client
from labcloud.storage.zipstream import zip_stream
from tests.aws import MotoServer

BUCKET = "labcloud-contract"


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        root = tmp_path / "root"
        root.mkdir()
        return LocalStorage(root)
    aws: MotoServer = request.getfixturevalue("aws")
    aws.client("s3").create_bucket(Bucket=BUCKET)
    return S3Storage(s3_client(), BUCKET, prefix="labcloud/data")


def put(storage: Storage, key: str, data: bytes = b"x") -> Entry:
    return storage.write(key, io.BytesIO(data))


def read(storage: Storage, key: str) -> bytes:
    with storage.open_read(key) as stream:
        return stream.read()


class RecordingStream(io.RawIOBase):
    """A readable stream that remembers the sizes asked for, optionally failing."""

    def __init__(self, size: int, fail_after: int | None = None) -> None:
        super().__init__()
        self.remaining = size
        self.requests: list[int] = []
        self.fail_after = fail_after
        self.served = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.requests.append(size)
        if self.fail_after is not None and self.served >= self.fail_after:
            raise OSError("client went away")
        count = min(self.remaining, size if size >= 0 else self.remaining)
        self.remaining -= count
        self.served += count
        return b"z" * count


def test_write_and_read(storage: Storage) -> None:
    entry = put(storage, "u1/data/run1/a.txt", b"hello")
    assert entry == Entry("u1/data/run1/a.txt", EntryType.FILE, 5)
    assert storage.stat("u1/data/run1/a.txt") == entry
    assert storage.stat("u1/data/run1") == Entry("u1/data/run1", EntryType.DIRECTORY, 0)
    assert storage.stat("u1/data/nothing") is None
    assert read(storage, "u1/data/run1/a.txt") == b"hello"
    assert put(storage, "u1/data/empty.txt", b"") == Entry("u1/data/empty.txt", EntryType.FILE, 0)
    assert read(storage, "u1/data/empty.txt") == b""


def test_write_replaces_a_file(storage: Storage) -> None:
    put(storage, "u1/data/a.txt", b"old")
    assert put(storage, "u1/data/a.txt", b"newer").size == 5
    assert read(storage, "u1/data/a.txt") == b"newer"


def test_write_reads_in_chunks(storage: Storage) -> None:
    stream = RecordingStream(2 * CHUNK_SIZE + 10)
    entry = storage.write("u1/data/big.bin", stream)  # type: ignore[arg-type]
    assert entry.size == 2 * CHUNK_SIZE + 10
    assert stream.requests and all(0 < size <= CHUNK_SIZE for size in stream.requests)
    assert read(storage, "u1/data/big.bin") == b"z" * (2 * CHUNK_SIZE + 10)


def test_failed_write_leaves_the_previous_file(storage: Storage) -> None:
    put(storage, "u1/data/a.bin", b"previous")
    stream = RecordingStream(3 * CHUNK_SIZE, fail_after=CHUNK_SIZE)
    with pytest.raises(OSError, match="client went away"):
        storage.write("u1/data/a.bin", stream)  # type: ignore[arg-type]
    assert read(storage, "u1/data/a.bin") == b"previous"
    assert [entry.key for entry in storage.list("u1/data")] == ["u1/data/a.bin"]


def test_write_refuses_folders_in_the_way(storage: Storage) -> None:
    storage.make_folder("u1/data/run1")
    with pytest.raises(Conflict, match="'u1/data/run1' is a folder"):
        put(storage, "u1/data/run1")
    put(storage, "u1/data/file")
    with pytest.raises(Conflict, match="'u1/data/file' is a file, not a folder"):
        put(storage, "u1/data/file/inner")
    with pytest.raises(Conflict, match="is a file, not a folder"):
        storage.make_folder("u1/data/file/sub")
    with pytest.raises(Conflict, match="is a file, not a folder"):
        storage.make_folder("u1/data/file")


def test_list_is_sorted_with_sizes(storage: Storage) -> None:
    put(storage, "u1/data/b.txt", b"bb")
    put(storage, "u1/data/a/inner.txt", b"iii")
    put(storage, "u1/data/a.txt", b"a")
    storage.make_folder("u1/data/empty")
    assert storage.list("u1/data") == [
        Entry("u1/data/a", EntryType.DIRECTORY, 0),
        Entry("u1/data/a.txt", EntryType.FILE, 1),
        Entry("u1/data/b.txt", EntryType.FILE, 2),
        Entry("u1/data/empty", EntryType.DIRECTORY, 0),
    ]
    assert storage.list("u1/data", recursive=True) == [
        Entry("u1/data/a", EntryType.DIRECTORY, 0),
        Entry("u1/data/a.txt", EntryType.FILE, 1),
        Entry("u1/data/a/inner.txt", EntryType.FILE, 3),
        Entry("u1/data/b.txt", EntryType.FILE, 2),
        Entry("u1/data/empty", EntryType.DIRECTORY, 0),
    ]
    assert [entry.key for entry in storage.list("u1/data", recursive=True, show_dirs=False)] == [
        "u1/data/a.txt",
        "u1/data/a/inner.txt",
        "u1/data/b.txt",
    ]
    assert storage.list("u1/data", show_dirs=False) == [
        Entry("u1/data/a.txt", EntryType.FILE, 1),
        Entry("u1/data/b.txt", EntryType.FILE, 2),
    ]
    assert storage.list("u1/data/empty") == []
    assert storage.list("u1/missing") == []
    assert storage.list("u1/data/a.txt") == []


def test_iter_files_is_sorted_and_recursive(storage: Storage) -> None:
    for key in ("u1/d/z.txt", "u1/d/a/b/c.txt", "u1/d/a.txt", "u1/d/a-b.txt", "u1/d/a/b.txt"):
        put(storage, key)
    storage.make_folder("u1/d/empty")
    keys = [entry.key for entry in storage.iter_files("u1/d")]
    assert keys == sorted(keys)
    assert len(keys) == 5
    assert [entry.key for entry in storage.iter_files("u1/d/z.txt")] == ["u1/d/z.txt"]
    assert list(storage.iter_files("u1/none")) == []
    assert list(storage.iter_files("u1/d/empty")) == []


def test_move(storage: Storage) -> None:
    put(storage, "u1/data/a.txt", b"abc")
    moved = storage.move("u1/data/a.txt", "u1/artifact/new/b.txt")
    assert moved == Entry("u1/artifact/new/b.txt", EntryType.FILE, 3)
    assert storage.stat("u1/data/a.txt") is None
    assert read(storage, "u1/artifact/new/b.txt") == b"abc"
    # The folder the file left stays, as an empty folder.
    assert storage.stat("u1/data") == Entry("u1/data", EntryType.DIRECTORY, 0)
    storage.make_folder("u1/data/folder")
    assert storage.move("u1/data/folder", "u1/data/renamed").type is EntryType.DIRECTORY
    assert storage.list("u1/data") == [Entry("u1/data/renamed", EntryType.DIRECTORY, 0)]


def test_move_a_folder_with_its_contents(storage: Storage) -> None:
    put(storage, "u1/data/run/a.txt", b"a")
    put(storage, "u1/data/run/sub/b.txt", b"bb")
    storage.make_folder("u1/data/run/empty")
    assert storage.move("u1/data/run", "u1/data/run2").type is EntryType.DIRECTORY
    assert storage.stat("u1/data/run") is None
    assert storage.list("u1/data/run2", recursive=True) == [
        Entry("u1/data/run2/a.txt", EntryType.FILE, 1),
        Entry("u1/data/run2/empty", EntryType.DIRECTORY, 0),
        Entry("u1/data/run2/sub", EntryType.DIRECTORY, 0),
        Entry("u1/data/run2/sub/b.txt", EntryType.FILE, 2),
    ]
    assert read(storage, "u1/data/run2/sub/b.txt") == b"bb"


def test_move_never_overwrites(storage: Storage) -> None:
    put(storage, "u1/data/a.txt", b"a")
    put(storage, "u1/data/b.txt", b"b")
    with pytest.raises(Conflict, match=re.escape("'u1/data/b.txt' already exists")):
        storage.move("u1/data/a.txt", "u1/data/b.txt")
    assert read(storage, "u1/data/b.txt") == b"b"
    storage.make_folder("u1/data/f")
    storage.make_folder("u1/data/g")
    with pytest.raises(Conflict):
        storage.move("u1/data/f", "u1/data/g")
    with pytest.raises(BadRequest, match="into itself"):
        storage.move("u1/data/f", "u1/data/f/inner")
    with pytest.raises(NotFound):
        storage.move("u1/data/none", "u1/data/other")
    with pytest.raises(Conflict, match="is a file, not a folder"):
        storage.move("u1/data/f", "u1/data/a.txt/f")


def test_delete_is_idempotent(storage: Storage) -> None:
    put(storage, "u1/data/a.txt")
    put(storage, "u1/data/tree/x/y.txt")
    storage.make_folder("u1/data/tree/empty")
    storage.delete("u1/data/a.txt")
    storage.delete("u1/data/a.txt")
    storage.delete("u1/data/tree")
    storage.delete("u1/data/tree")
    storage.delete("u1/never/existed")
    assert storage.list("u1/data") == []
    # The folder that held them stays.
    assert storage.stat("u1/data") == Entry("u1/data", EntryType.DIRECTORY, 0)
    assert storage.stat("u1/never") is None


def test_open_read_of_missing_or_folder(storage: Storage) -> None:
    storage.make_folder("u1/data")
    with pytest.raises(NotFound):
        storage.open_read("u1/data")
    with pytest.raises(NotFound):
        storage.open_read("u1/data/none")


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "u1/../../x", "u1//a", ""])
def test_keys_are_checked_again(storage: Storage, key: str) -> None:
    with pytest.raises(UnsafePath):
        storage.stat(key)
    with pytest.raises(UnsafePath):
        put(storage, key)
    with pytest.raises(UnsafePath):
        storage.delete(key)


def test_a_folder_streams_as_a_zip(storage: Storage) -> None:
    put(storage, "u1/data/run/a.txt", b"alpha " * 1000)
    put(storage, "u1/data/run/sub/b.bin", bytes(range(256)) * 8192)
    storage.make_folder("u1/data/run/empty")
    chunks = list(zip_stream(storage, "u1/data/run", chunk_size=64 * 1024))
    assert all(len(chunk) <= 2 * 64 * 1024 + 1024 for chunk in chunks[:-1])
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == ["a.txt", "sub/b.bin"]
        assert archive.read("sub/b.bin") == bytes(range(256)) * 8192
