"""LocalStorage against a real temporary folder."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from labcloud.errors import BadRequest, Conflict, NotFound
from labcloud.storage.base import CHUNK_SIZE, Entry, EntryType
from labcloud.storage.local import LocalStorage
from labcloud.storage.paths import PARTIAL_PREFIX, UnsafePath


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    root = tmp_path / "root"
    root.mkdir()
    return LocalStorage(root)


def put(storage: LocalStorage, key: str, data: bytes = b"x") -> Entry:
    return storage.write(key, io.BytesIO(data))


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


def test_write_and_read(storage: LocalStorage) -> None:
    entry = put(storage, "u1/data/run1/a.txt", b"hello")
    assert entry == Entry("u1/data/run1/a.txt", EntryType.FILE, 5)
    assert storage.stat("u1/data/run1/a.txt") == entry
    assert storage.stat("u1/data/run1") == Entry("u1/data/run1", EntryType.DIRECTORY, 0)
    assert storage.stat("u1/data/nothing") is None
    with storage.open_read("u1/data/run1/a.txt") as stream:
        assert stream.read() == b"hello"
    assert storage.local_path("u1/data/run1/a.txt") == storage.root / "u1/data/run1/a.txt"
    assert storage.local_path("u1/data/run1") is None
    assert (storage.root / "u1/data/run1/a.txt").stat().st_mode & 0o777 == 0o644


def test_write_replaces_a_file(storage: LocalStorage) -> None:
    put(storage, "u1/data/a.txt", b"old")
    assert put(storage, "u1/data/a.txt", b"newer").size == 5
    with storage.open_read("u1/data/a.txt") as stream:
        assert stream.read() == b"newer"


def test_write_copies_in_chunks(storage: LocalStorage) -> None:
    stream = RecordingStream(2 * CHUNK_SIZE + 10)
    entry = storage.write("u1/data/big.bin", stream)  # type: ignore[arg-type]
    assert entry.size == 2 * CHUNK_SIZE + 10
    assert stream.requests and all(0 < size <= CHUNK_SIZE for size in stream.requests)


def test_failed_write_leaves_nothing(storage: LocalStorage) -> None:
    put(storage, "u1/data/a.bin", b"previous")
    stream = RecordingStream(3 * CHUNK_SIZE, fail_after=CHUNK_SIZE)
    with pytest.raises(OSError, match="client went away"):
        storage.write("u1/data/a.bin", stream)  # type: ignore[arg-type]
    with storage.open_read("u1/data/a.bin") as existing:
        assert existing.read() == b"previous"
    assert sorted(os.listdir(storage.root / "u1/data")) == ["a.bin"]


def test_partial_files_are_invisible(storage: LocalStorage) -> None:
    put(storage, "u1/data/a.txt")
    (storage.root / "u1/data" / f"{PARTIAL_PREFIX}abc").write_bytes(b"half")
    assert [entry.key for entry in storage.list("u1/data")] == ["u1/data/a.txt"]
    assert [entry.key for entry in storage.iter_files("u1")] == ["u1/data/a.txt"]


def test_write_refuses_folders_in_the_way(storage: LocalStorage) -> None:
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


def test_list_is_sorted_with_sizes(storage: LocalStorage) -> None:
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
    recursive = storage.list("u1/data", recursive=True)
    assert [entry.key for entry in recursive] == sorted(entry.key for entry in recursive)
    assert Entry("u1/data/a/inner.txt", EntryType.FILE, 3) in recursive
    assert [entry.key for entry in storage.list("u1/data", recursive=True, show_dirs=False)] == [
        "u1/data/a.txt",
        "u1/data/a/inner.txt",
        "u1/data/b.txt",
    ]
    assert storage.list("u1/missing") == []
    assert storage.list("u1/data/a.txt") == []


def test_iter_files_is_sorted_and_recursive(storage: LocalStorage) -> None:
    for key in ("u1/d/z.txt", "u1/d/a/b/c.txt", "u1/d/a.txt", "u1/d/a-b.txt", "u1/d/a/b.txt"):
        put(storage, key)
    storage.make_folder("u1/d/empty")
    keys = [entry.key for entry in storage.iter_files("u1/d")]
    assert keys == sorted(keys)
    assert len(keys) == 5
    assert [entry.key for entry in storage.iter_files("u1/d/z.txt")] == ["u1/d/z.txt"]
    assert list(storage.iter_files("u1/none")) == []


def test_move(storage: LocalStorage) -> None:
    put(storage, "u1/data/a.txt", b"abc")
    moved = storage.move("u1/data/a.txt", "u1/artifact/new/b.txt")
    assert moved == Entry("u1/artifact/new/b.txt", EntryType.FILE, 3)
    assert storage.stat("u1/data/a.txt") is None
    storage.make_folder("u1/data/folder")
    assert storage.move("u1/data/folder", "u1/data/renamed").type is EntryType.DIRECTORY


def test_move_never_overwrites(storage: LocalStorage) -> None:
    put(storage, "u1/data/a.txt", b"a")
    put(storage, "u1/data/b.txt", b"b")
    with pytest.raises(Conflict, match=re.escape("'u1/data/b.txt' already exists")):
        storage.move("u1/data/a.txt", "u1/data/b.txt")
    with storage.open_read("u1/data/b.txt") as stream:
        assert stream.read() == b"b"
    storage.make_folder("u1/data/f")
    storage.make_folder("u1/data/g")
    with pytest.raises(Conflict):
        storage.move("u1/data/f", "u1/data/g")
    with pytest.raises(BadRequest, match="into itself"):
        storage.move("u1/data/f", "u1/data/f/inner")
    with pytest.raises(NotFound):
        storage.move("u1/data/none", "u1/data/other")


def test_delete_is_idempotent(storage: LocalStorage) -> None:
    put(storage, "u1/data/a.txt")
    put(storage, "u1/data/tree/x/y.txt")
    storage.delete("u1/data/a.txt")
    storage.delete("u1/data/a.txt")
    storage.delete("u1/data/tree")
    storage.delete("u1/data/tree")
    storage.delete("u1/never/existed")
    assert storage.list("u1/data") == []


def test_open_read_of_missing_or_folder(storage: LocalStorage) -> None:
    storage.make_folder("u1/data")
    with pytest.raises(NotFound):
        storage.open_read("u1/data")
    with pytest.raises(NotFound):
        storage.open_read("u1/data/none")


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "u1/../../x", "u1//a", ""])
def test_keys_are_checked_again(storage: LocalStorage, key: str) -> None:
    with pytest.raises(UnsafePath):
        storage.stat(key)
    with pytest.raises(UnsafePath):
        put(storage, key)


def test_symbolic_links_out_of_the_root_are_refused(storage: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    storage.make_folder("u1/data")
    (storage.root / "u1/data/link").symlink_to(outside)
    (storage.root / "u1/data/file-link").symlink_to(outside / "secret.txt")
    put(storage, "u1/data/ok.txt")
    with pytest.raises(UnsafePath, match="leads outside the storage root"):
        storage.open_read("u1/data/link/secret.txt")
    with pytest.raises(UnsafePath, match="leads outside the storage root"):
        storage.stat("u1/data/file-link")
    with pytest.raises(UnsafePath):
        put(storage, "u1/data/link/new.txt")
    assert not (outside / "new.txt").exists()
    assert [entry.key for entry in storage.list("u1/data", recursive=True)] == ["u1/data/ok.txt"]
    assert [entry.key for entry in storage.iter_files("u1/data")] == ["u1/data/ok.txt"]
    # Deleting the link removes the link, not what it points to.
    storage.delete("u1/data/link")
    assert (outside / "secret.txt").exists()
    assert not (storage.root / "u1/data/link").exists()


def test_symbolic_links_inside_the_root_are_followed_for_files(storage: LocalStorage) -> None:
    put(storage, "u1/data/real.txt", b"real")
    (storage.root / "u1/data/alias.txt").symlink_to(storage.root / "u1/data/real.txt")
    assert storage.stat("u1/data/alias.txt") == Entry("u1/data/alias.txt", EntryType.FILE, 4)
    assert [entry.key for entry in storage.list("u1/data")] == [
        "u1/data/alias.txt",
        "u1/data/real.txt",
    ]
