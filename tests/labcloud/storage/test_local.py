"""What only LocalStorage does, against a real temporary folder: chunked copies,
partial files nobody sees, symbolic links. The contract both storages hold is
test_contract.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from labcloud.storage.base import CHUNK_SIZE, Entry, EntryType
from labcloud.storage.local import LocalStorage
from labcloud.storage.paths import PARTIAL_PREFIX, UnsafePath
from tests.labcloud.storage.test_contract import RecordingStream, put


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    root = tmp_path / "root"
    root.mkdir()
    return LocalStorage(root)


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
