"""The user's files: what the files routes do, without HTTP.

Paths are relative to the user's root and start with an area
(``config/``, ``data/``, ``artifact/``, ``output/``, ``log/``). Every path is turned
into a storage key by ``labcloud.storage.paths`` before storage is touched, and
every refusal (an unsafe path, an area that takes no uploads, a file where a folder
should be) happens before anything is written. The five area folders always exist
as far as users can tell, whether or not storage holds them yet; they cannot be
renamed or deleted.

Transfers without the bearer token are the storage's transfer requests: this module
authorises them and asks the storage, which signs (local) or presigns (S3) them. The
``/_signed/{token}`` routes that redeem local storage's URLs are ``user_api.files.signed``.

Bytes stored count against the user's storage limit. Given the account's
``UsageLedger`` (``user_api.files.usage``), writes reserve and settle their bytes
there and deletions subtract theirs, so no check lists storage; without one, the
bytes are summed from storage at each check (``labcloud.storage.quota``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import UPLOAD_AREAS, FileArea, SignedRequest
from labcloud.db import unit_of_work
from labcloud.errors import BadRequest, Conflict, MethodNotAllowed, NotFound
from labcloud.storage.base import Entry, EntryType, Storage
from labcloud.storage.paths import (
    area_key,
    split_user_key,
    user_key,
    user_relative_path,
    user_root_key,
)
from labcloud.storage.quota import (
    StorageLimitReached,
    UsageLedger,
    bytes_stored,
    remaining_bytes,
    write_files_within_limit,
)
from labcloud.storage.uploads import (
    IncomingFile,
    check_file_target,
    check_parents,
    folder_upload_keys,
)
from user_api.files.schemas import FileInfo, UploadedFiles
from user_api.jobs import repository as jobs_repository

_SIZE_SUFFIXES = ("kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB", "RB", "QB")

JobNamed = Callable[[str, str], bool]
"""``job_named(subject, name)``: whether that account has a job called ``name``."""
# The name offered for a zip of the user's whole root.
ROOT_ARCHIVE_NAME = "files"


class JobResultsFolder(Conflict):
    """The folder receives a job's results and is removed with that job."""


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


def job_name_lookup(session_factory: sessionmaker[Session]) -> JobNamed:
    """``JobNamed`` reading the jobs table in a short transaction of its own per
    question (the files routes keep none open while files move)."""

    def job_named(subject: str, name: str) -> bool:
        with unit_of_work(session_factory) as session:
            return jobs_repository.has_job_named(session, subject, name)

    return job_named


def _refuse_job_results(key: str, job_named: JobNamed) -> None:
    """Refuse a write at or under ``artifact/<name>`` while the user has a job called
    ``name``: that folder receives the job's results and is removed with the job,
    so a file the user put there would be deleted with it. (Creating a job whose
    result folders already hold files is refused for the same reason.)"""
    parts = split_user_key(key)
    if parts.area is not FileArea.ARTIFACT or not parts.relative:
        return
    name = parts.relative.split("/", 1)[0]
    if job_named(parts.subject, name):
        raise JobResultsFolder(
            f"'artifact/{name}/' holds the results of your job {name!r} and is removed "
            "when that job is deleted; put your files in another folder"
        )


def _check_parents(storage: Storage, key: str) -> None:
    """Refuse ``key`` when one of the folders above it (from the area down) is a
    file."""
    check_parents(storage, key, display=_display)


def _file_target(storage: Storage, key: str) -> str:
    """Check that a file may be written at ``key``: no folder there, no file
    above it."""
    check_file_target(storage, key, display=_display)
    return key


def check_upload_targets(
    storage: Storage, targets: list[tuple[str, BinaryIO]], job_named: JobNamed
) -> list[tuple[str, BinaryIO]]:
    """``targets`` (storage key, body), each checked before anything is written:
    not in a job's results folder, no folder in the way, no file above it."""
    for key, _ in targets:
        _refuse_job_results(key, job_named)
        _file_target(storage, key)
    return targets


def _folder_targets(
    storage: Storage, folder_key: str, parts: Sequence[IncomingFile], job_named: JobNamed
) -> list[tuple[str, BinaryIO]]:
    """Where each uploaded part goes inside ``folder_key`` (under its file name,
    which may be a relative path), every one checked before anything is written."""
    keys = folder_upload_keys(folder_key, [part.filename for part in parts])
    targets = [(key, part.stream) for key, part in zip(keys, parts, strict=True)]
    return check_upload_targets(storage, targets, job_named)


def uploaded_files(folder_key: str, entries: list[Entry]) -> UploadedFiles:
    """The response of an upload: the file when one was sent, the folder (and the
    bytes in all) for several; ``files`` lists each."""
    files = [file_info(entry) for entry in entries]
    if len(files) == 1:
        return UploadedFiles(**files[0].model_dump(), files=files)
    total = sum(entry.size for entry in entries)
    return UploadedFiles(
        path=_display(folder_key, EntryType.DIRECTORY),
        type=EntryType.DIRECTORY,
        size=natural_size(total),
        size_bytes=total,
        files=files,
    )


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
        return DownloadTarget(key, ROOT_ARCHIVE_NAME)
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


def download_url(storage: Storage, subject: str, path: str, *, expires_in: int) -> SignedRequest:
    """A short-lived GET that downloads ``path`` without the bearer token (the
    storage's transfer request)."""
    target = _existing(storage, subject, path)
    return storage.download_request(target.key, expires_in=expires_in)


def upload_files(
    storage: Storage,
    subject: str,
    area: str,
    folder: str,
    parts: Sequence[IncomingFile],
    *,
    job_named: JobNamed,
    max_bytes: int | None = None,
    usage: UsageLedger | None = None,
) -> UploadedFiles:
    """Store each part as ``<area>/<folder>/<its file name>``, replacing files of
    those names. ``area`` must be one that takes uploads (config, data, artifact).
    All parts are stored or none (``labcloud.storage.uploads``); refused with
    ``StorageLimitReached`` when the user's files would exceed ``max_bytes`` (None:
    no limit), and with ``JobResultsFolder`` inside a job's ``artifact/<name>/``.
    ``usage``: the ledger the bytes are reserved from (None: summed from storage)."""
    folder_key = _upload_key(subject, area, folder)
    targets = _folder_targets(storage, folder_key, parts, job_named)
    return uploaded_files(
        folder_key, write_files_within_limit(storage, subject, targets, max_bytes, usage=usage)
    )


def upload_file(
    storage: Storage,
    subject: str,
    area: str,
    folder: str,
    *,
    filename: str | None,
    stream: BinaryIO,
    job_named: JobNamed,
    max_bytes: int | None = None,
    usage: UsageLedger | None = None,
) -> FileInfo:
    """Store one file as ``<area>/<folder>/<filename>`` (see ``upload_files``)."""
    uploaded = upload_files(
        storage,
        subject,
        area,
        folder,
        [IncomingFile(filename, stream)],
        job_named=job_named,
        max_bytes=max_bytes,
        usage=usage,
    )
    return uploaded.files[0]


def upload_url(
    storage: Storage,
    subject: str,
    area: str,
    folder: str,
    *,
    expires_in: int,
    max_bytes: int | None,
    job_named: JobNamed,
    usage: UsageLedger | None = None,
) -> SignedRequest:
    """A short-lived POST, good for one upload, that stores files (multipart field
    ``file``) in ``<area>/<folder>/`` under their own names, without the bearer
    token: the storage's transfer request, carrying at most what the user may
    still store under ``max_bytes`` (the user's storage limit; None: no limit). A
    user with nothing left gets ``StorageLimitReached`` instead of a URL. Where the
    upload lands, the limit is checked again against what the user then stores.

    With ``usage``, the bytes used come from the ledger, and the ledger is told
    that bytes may land outside the API until the URL expires (an S3 upload never
    passes through it), so its checks recount meanwhile."""
    folder_key = _upload_key(subject, area, folder)
    _refuse_job_results(folder_key, job_named)
    existing = storage.stat(folder_key)
    if existing is not None and existing.type is EntryType.FILE:
        raise Conflict(f"{_display(folder_key)!r} is a file, not a folder")
    _check_parents(storage, folder_key)
    cap: int | None = None
    if max_bytes is not None:
        used = usage.used(subject) if usage is not None else bytes_stored(storage, subject)
        cap = remaining_bytes(max_bytes, used)
        if not cap:
            raise StorageLimitReached(
                f"storage limit reached: you store {used:,} bytes of your limit of "
                f"{max_bytes:,} bytes; delete files you no longer need before uploading more"
            )
    if usage is not None:
        usage.expect_outside_writes(subject, expires_in=expires_in)
    return storage.upload_into_request(folder_key, expires_in=expires_in, max_bytes=cap)


def make_folder(
    storage: Storage, subject: str, area: str, path: str, *, job_named: JobNamed
) -> FileInfo:
    """Create ``<area>/<path>/`` and its parents; an existing folder is fine."""
    key = _upload_key(subject, area, path)
    _refuse_job_results(key, job_named)
    existing = storage.stat(key)
    if existing is not None and existing.type is EntryType.FILE:
        raise Conflict(f"{_display(key)!r} is a file, not a folder")
    _check_parents(storage, key)
    return file_info(storage.make_folder(key))


def rename(
    storage: Storage, subject: str, path: str, new_path: str, *, job_named: JobNamed
) -> FileInfo:
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
    _refuse_job_results(target, job_named)
    if target.startswith(source + "/"):
        raise BadRequest(f"cannot move {_display(source, entry.type)!r} into itself")
    existing = _stat(storage, target)
    if existing is not None:
        raise Conflict(f"{_display(target, existing.type)!r} already exists")
    _check_parents(storage, target)
    return file_info(storage.move(source, target))


def delete(storage: Storage, subject: str, path: str, *, usage: UsageLedger | None = None) -> None:
    """Delete a file or a folder with everything in it. Raises ``NotFound`` when
    nothing is there (so a typo is not mistaken for a deletion); area folders and
    the root cannot be deleted (``MethodNotAllowed``). With ``usage``, what was
    removed is subtracted from the user's count."""
    if _is_root(path):
        raise MethodNotAllowed("your root folder cannot be deleted")
    key = user_key(subject, path)
    if _is_area(key):
        raise MethodNotAllowed(
            f"the area folder {_display(key, EntryType.DIRECTORY)!r} cannot be deleted; "
            "delete what is inside it instead"
        )
    entry = storage.stat(key)
    if entry is None:
        raise NotFound(f"no file or folder at {_display(key)!r}")
    if usage is None:
        storage.delete(key)
        return
    # Sized before deleting (a folder: a walk of that folder only, as S3 needs to
    # delete it anyway), subtracted once the deletion succeeded.
    freed = (
        entry.size
        if entry.type is EntryType.FILE
        else sum(file.size for file in storage.iter_files(key))
    )
    storage.delete(key)
    usage.adjust(subject, -freed)
