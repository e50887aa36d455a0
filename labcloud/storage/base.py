"""The storage interface shared by both APIs.

A *key* is a normalised, relative POSIX path under the storage root, such as
``"17/data/run1/frame.tif"`` (``<user_id>/<area>/<path>``). Keys are produced only by
``labcloud.storage.paths`` after validation, so implementations may trust them.
A folder is a key under which other keys exist (S3 has no real folders; the local
implementation has real directories).

Besides moving bytes itself, a storage hands out *transfer requests*: the
``{"method", "url", "headers", "data"}`` of a request that moves a file without the
API's bearer token (``labcloud.contract.SignedRequest``). S3 presigns them; local
storage signs URLs to the API it serves (``labcloud.storage.transfers``). Callers
authorise the transfer first and never build such a URL themselves.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from labcloud.contract import SignedRequest

CHUNK_SIZE = 1024 * 1024


class EntryType(StrEnum):
    FILE = "file"
    DIRECTORY = "directory"


@dataclass(frozen=True, slots=True)
class Entry:
    """One file or folder. ``key`` is the full storage key; ``size`` is in bytes
    (0 for folders)."""

    key: str
    type: EntryType
    size: int


class Storage(abc.ABC):
    """Where users' files and jobs' results live. All methods are blocking; call
    them from sync endpoints or worker threads."""

    @abc.abstractmethod
    def stat(self, key: str) -> Entry | None:
        """The entry at ``key``, or None when nothing exists there."""

    @abc.abstractmethod
    def list(self, key: str, *, recursive: bool = False, show_dirs: bool = True) -> list[Entry]:
        """Entries under the folder ``key``, sorted by key. Empty when the folder
        does not exist."""

    @abc.abstractmethod
    def iter_files(self, key: str) -> Iterator[Entry]:
        """Every file under the folder ``key`` (recursively), sorted by key; just
        the file itself when ``key`` is a file."""

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A readable binary stream of the file at ``key``."""

    @abc.abstractmethod
    def write(self, key: str, stream: BinaryIO) -> Entry:
        """Write ``stream`` to ``key`` in chunks, atomically (readers never see a
        partial file), creating parent folders. Replaces an existing file."""

    @abc.abstractmethod
    def make_folder(self, key: str) -> Entry:
        """Create the folder ``key`` and its parents; idempotent."""

    @abc.abstractmethod
    def move(self, source: str, target: str) -> Entry:
        """Rename a file or folder."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete a file or a folder with everything under it; idempotent."""

    @abc.abstractmethod
    def download_request(self, key: str, *, expires_in: int) -> SignedRequest:
        """A GET, good for ``expires_in`` seconds, that downloads the file at ``key``
        (local storage also sends a folder, as a zip)."""

    @abc.abstractmethod
    def upload_request(self, key: str, *, expires_in: int, max_bytes: int | None) -> SignedRequest:
        """A POST, good for ``expires_in`` seconds, that stores one file at exactly
        ``key``: the client adds the file as the multipart field ``file`` (after the
        form fields in ``data``). It carries at most ``max_bytes`` (None: no cap)."""

    @abc.abstractmethod
    def upload_into_request(
        self, folder_key: str, *, expires_in: int, max_bytes: int | None
    ) -> SignedRequest:
        """Like ``upload_request``, but the file goes into the folder ``folder_key``
        under the multipart part's file name (S3: a presigned POST for the key
        ``<folder>/${filename}``)."""

    def local_path(self, key: str) -> Path | None:
        """The file's path on this machine, when the storage is local (lets the
        HTTP layer use sendfile); None otherwise."""
        return None
