"""The user's files: what the files routes do, without HTTP.

Paths are relative to the user's root and start with an area
(``config/``, ``data/``, ``artifact/``, ``output/``, ``log/``). Every path is turned
into a storage key by ``labcloud.storage.paths`` before storage is touched, and
every refusal (an unsafe path, an area that takes no uploads, a file where a folder
should be) happens before anything is written. The five area folders always exist
as far as users can tell, whether or not storage holds them yet; they cannot be
renamed or deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from labcloud.contract import UPLOAD_AREAS, FileArea, SignedRequest
from labcloud.errors import BadRequest, Conflict, MethodNotAllowed, NotFound
from labcloud.storage.base import Entry, EntryType, Storage
from labcloud.storage.paths import (
    area_key,
    child_key,
    split_user_key,
    user_key,
    user_relative_path,
    user_root_key,
)
from labcloud.storage.signing import TransferPurpose, UrlSigner
from user_api.files.schemas import FileInfo
from user_api.limits import write_within_storage_limit

_SIZE_SUFFIXES = ("kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB", "RB", "QB")
# The name offered for a zip of the user's whole root.
_ROOT_ARCHIVE_NAME = "files"


@dataclass(frozen=True, slots=True)
class DownloadTarget:
    """What to send: the storage key and the name the client should save it as
    (a folder is sent as ``<filename>.zip``)."""

    key: str
    filename: str


def natural_size(size: int) -> str:
    """A byte count as upstream shows it (``humanize.naturalsize``, decimal units):
    "1 Byte", "999 Bytes", "1.2 kB", "3.4 MB"."""
    if size == 1:
        return "1 Byte"
    if size < 1000:
        return f"{size} Bytes"
    # The same arithmetic as humanize, so values round identically.
    for exponent, suffix in enumerate(_SIZE_SUFFIXES, start=2):
        unit = 1000**exponent
        if size < unit or suffix == _SIZE_SUFFIXES[-1]:
            break
    return f"{1000 * size / unit:.1f} {suffix}"


def _display(key: str, entry_type: EntryType = EntryType.FILE) -> str:
    """The path a user sees for ``key``; folders end with '/'."""
    path = user_relative_path(key)
    return path + "/" if entry_type is EntryType.DIRECTORY else path


def file_info(entry: Entry) -> FileInfo:
    """The response model of one storage entry."""
    is_folder = entry.type is EntryType.DIRECTORY
    return FileInfo(
        path=_display(entry.key, entry.type),
        type=entry.type,
        size="" if is_folder else natural_size(entry.size),
        size_bytes=entry.size,
    )


def _is_root(path: str) -> bool:
    return not path.strip("/")


def _is_area(key: str) -> bool:
    return split_user_key(key).relative == ""


def _stat(storage: Storage, key: str) -> Entry | None:
    """Like ``storage.stat``, with area folders existing even before storage holds
    them."""
    entry = storage.stat(key)
    if entry is None and _is_area(key):
        return Entry(key, EntryType.DIRECTORY, 0)
    return entry


def _upload_key(subject: str, area: str, path: str) -> str:
    """The key of ``path`` inside an area that accepts uploads."""
    return user_key(subject, f"{area}/{path}", allowed_areas=UPLOAD_AREAS)


def _check_parents(storage: Storage, key: str) -> None:
    """Refuse ``key`` when one of the folders above it is a file."""
    segments = key.split("/")
    # segments[0] is the user's root, segments[1] the area: check from the area down.
    for depth in range(2, len(segments)):
        ancestor = "/".join(segments[:depth])
        entry = storage.stat(ancestor)
        if entry is None:
            return
        if entry.type is EntryType.FILE:
            raise Conflict(f"{_display(ancestor)!r} is a file, not a folder")


def _file_target(storage: Storage, key: str) -> str:
    """Check that a file may be written at ``key``: no folder there, no file
    above it."""
    existing = storage.stat(key)
    if existing is not None and existing.type is EntryType.DIRECTORY:
        raise Conflict(
            f"{_display(key, EntryType.DIRECTORY)!r} is a folder; a file cannot replace it"
        )
    _check_parents(storage, key)
    return key


def _named_target(storage: Storage, folder_key: str, filename: str | None) -> str:
    """The key of an uploaded file named ``filename`` inside ``folder_key``."""
    if not filename:
        raise BadRequest(
            "the upload has no file name: send the file as multipart field 'file' with a name"
        )
    return _file_target(storage, child_key(folder_key, filename))


def list_files(
    storage: Storage, subject: str, path: str, *, show_dirs: bool = True, recursive: bool = False
) -> list[FileInfo]:
    """The contents of a folder (the areas, for the root "" or "/"), or the file
    itself when ``path`` names one; sorted by path. Raises ``NotFound``."""
    entries: list[Entry] = []
    if _is_root(path):
        for area in FileArea:
            key = area_key(subject, area)
            if show_dirs:
                entries.append(Entry(key, EntryType.DIRECTORY, 0))
            if recursive:
                entries.extend(storage.list(key, recursive=True, show_dirs=show_dirs))
    else:
        key = user_key(subject, path)
        entry = _stat(storage, key)
        if entry is None:
            raise NotFound(f"no file or folder at {_display(key)!r}")
        if entry.type is EntryType.FILE:
            entries.append(entry)
        else:
            entries.extend(storage.list(key, recursive=recursive, show_dirs=show_dirs))
    return sorted((file_info(entry) for entry in entries), key=lambda info: info.path)


def _existing(storage: Storage, subject: str, path: str) -> DownloadTarget:
    if _is_root(path):
        key = user_root_key(subject)
        if storage.stat(key) is None:
            raise NotFound("you have no files yet")
        return DownloadTarget(key, _ROOT_ARCHIVE_NAME)
    key = user_key(subject, path)
    if storage.stat(key) is None:
        if _is_area(key):
            raise NotFound(f"{_display(key, EntryType.DIRECTORY)!r} has no files yet")
        raise NotFound(f"no file or folder at {_display(key)!r}")
    return DownloadTarget(key, PurePosixPath(key).name)


def download_target(storage: Storage, subject: str, path: str) -> DownloadTarget:
    """The file or folder to send for ``path`` (the whole root for "" or "/").
    Raises ``NotFound``."""
    return _existing(storage, subject, path)


def download_url(
    storage: Storage,
    signer: UrlSigner,
    subject: str,
    path: str,
    *,
    base_url: str,
    expires_in: int,
) -> SignedRequest:
    """A short-lived GET that downloads ``path`` without the bearer token."""
    target = _existing(storage, subject, path)
    return signer.sign(
        key=target.key, purpose=TransferPurpose.DOWNLOAD, base_url=base_url, expires_in=expires_in
    )


def upload_file(
    storage: Storage,
    subject: str,
    area: str,
    folder: str,
    *,
    filename: str | None,
    stream: BinaryIO,
    max_bytes: int | None = None,
) -> FileInfo:
    """Store ``stream`` as ``<area>/<folder>/<filename>``, replacing a file of that
    name. ``area`` must be one that takes uploads (config, data, artifact). Refused
    with ``StorageLimitReached`` when the user's files would exceed ``max_bytes``
    (None: no limit)."""
    key = _named_target(storage, _upload_key(subject, area, folder), filename)
    return file_info(write_within_storage_limit(storage, subject, key, stream, max_bytes))


def upload_url(
    storage: Storage,
    signer: UrlSigner,
    subject: str,
    area: str,
    folder: str,
    *,
    base_url: str,
    expires_in: int,
) -> SignedRequest:
    """A short-lived POST that stores one file (multipart field ``file``) in
    ``<area>/<folder>/`` under its own name, without the bearer token."""
    folder_key = _upload_key(subject, area, folder)
    existing = storage.stat(folder_key)
    if existing is not None and existing.type is EntryType.FILE:
        raise Conflict(f"{_display(folder_key)!r} is a file, not a folder")
    _check_parents(storage, folder_key)
    return signer.sign(
        key=folder_key,
        purpose=TransferPurpose.UPLOAD_INTO,
        base_url=base_url,
        expires_in=expires_in,
    )


def make_folder(storage: Storage, subject: str, area: str, path: str) -> FileInfo:
    """Create ``<area>/<path>/`` and its parents; an existing folder is fine."""
    key = _upload_key(subject, area, path)
    existing = storage.stat(key)
    if existing is not None and existing.type is EntryType.FILE:
        raise Conflict(f"{_display(key)!r} is a file, not a folder")
    _check_parents(storage, key)
    return file_info(storage.make_folder(key))


def rename(storage: Storage, subject: str, path: str, new_path: str) -> FileInfo:
    """Move a file or an empty folder to ``new_path``, which must lie in an area
    that takes uploads. Raises ``NotFound``, ``MethodNotAllowed`` (an area folder or
    a folder with contents) or ``Conflict`` (``new_path`` exists)."""
    if _is_root(path):
        raise MethodNotAllowed("your root folder cannot be renamed")
    source = user_key(subject, path)
    if _is_area(source):
        raise MethodNotAllowed(
            f"the area folder {_display(source, EntryType.DIRECTORY)!r} cannot be renamed"
        )
    entry = storage.stat(source)
    if entry is None:
        raise NotFound(f"no file or folder at {_display(source)!r}")
    if entry.type is EntryType.DIRECTORY and storage.list(source):
        raise MethodNotAllowed(
            f"{_display(source, EntryType.DIRECTORY)!r} is not empty: "
            "only files and empty folders can be renamed"
        )
    target = user_key(subject, new_path, allowed_areas=UPLOAD_AREAS)
    if target == source:
        return file_info(entry)
    if target.startswith(source + "/"):
        raise BadRequest(f"cannot move {_display(source, entry.type)!r} into itself")
    existing = _stat(storage, target)
    if existing is not None:
        raise Conflict(f"{_display(target, existing.type)!r} already exists")
    _check_parents(storage, target)
    return file_info(storage.move(source, target))


def delete(storage: Storage, subject: str, path: str) -> None:
    """Delete a file or a folder with everything in it; nothing there is fine.
    Area folders and the root cannot be deleted (``MethodNotAllowed``)."""
    if _is_root(path):
        raise MethodNotAllowed("your root folder cannot be deleted")
    key = user_key(subject, path)
    if _is_area(key):
        raise MethodNotAllowed(
            f"the area folder {_display(key, EntryType.DIRECTORY)!r} cannot be deleted; "
            "delete what is inside it instead"
        )
    storage.delete(key)


def signed_download_target(storage: Storage, signer: UrlSigner, token: str) -> DownloadTarget:
    """What a signed download URL names, if it is valid and the thing still exists.
    Raises ``SignedUrlInvalid`` or ``NotFound``."""
    key = signer.verify(token, TransferPurpose.DOWNLOAD)
    if storage.stat(key) is None:
        raise NotFound("the file or folder of this link no longer exists")
    name = PurePosixPath(key).name if "/" in key else _ROOT_ARCHIVE_NAME
    return DownloadTarget(key, name)


def signed_upload(
    storage: Storage,
    signer: UrlSigner,
    token: str,
    *,
    filename: str | None,
    stream: BinaryIO,
    storage_limit_of: Callable[[str], int | None] | None = None,
) -> FileInfo:
    """Store an upload sent to a signed URL: at the signed key, or inside the
    signed folder under the upload's name. Raises ``SignedUrlInvalid``, or
    ``StorageLimitReached`` when the owner's files would exceed the limit that
    ``storage_limit_of(subject)`` gives (no limit without it)."""
    transfer = signer.verify_transfer(token, (TransferPurpose.UPLOAD, TransferPurpose.UPLOAD_INTO))
    # Only keys in a user's areas can be reported back as file info.
    subject = split_user_key(transfer.key).subject
    if transfer.purpose is TransferPurpose.UPLOAD_INTO:
        key = _named_target(storage, transfer.key, filename)
    else:
        key = _file_target(storage, transfer.key)
    limit = storage_limit_of(subject) if storage_limit_of is not None else None
    return file_info(write_within_storage_limit(storage, subject, key, stream, limit))
