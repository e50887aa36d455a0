"""Uploads into a folder: where each multipart part goes, checked before any write.

A request to an upload route may carry several parts in the field ``file``: each is
stored, under its own file name (which may be a relative path, as a browser sends
for a folder upload), inside the target folder. Every name is checked like any user
path; a part without a name, two parts with the same name, a name that is a folder
of another part, or more than ``MAX_UPLOAD_PARTS`` parts refuse the whole request
with 400 before anything is written. No part is ever dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from labcloud.errors import BadRequest, Conflict
from labcloud.storage.base import EntryType, Storage
from labcloud.storage.paths import child_key

UPLOAD_FIELD = "file"
# Parts one request may carry: enough for a folder of results or a browser's folder
# upload, few enough that one request cannot make the server spool files without end.
MAX_UPLOAD_PARTS = 100


class UploadRefused(BadRequest):
    """The upload request is not valid."""


@dataclass(frozen=True, slots=True)
class IncomingFile:
    """One multipart part of an upload: its file name and its (spooled) body."""

    filename: str | None
    stream: BinaryIO


def check_part_count(count: int) -> None:
    """Refuse a request with no ``file`` part or with more than ``MAX_UPLOAD_PARTS``."""
    if count == 0:
        raise UploadRefused(f"send the file as the multipart field {UPLOAD_FIELD!r}")
    if count > MAX_UPLOAD_PARTS:
        raise UploadRefused(
            f"{count} files in one request: send at most {MAX_UPLOAD_PARTS} "
            f"(multipart field {UPLOAD_FIELD!r}), or several requests"
        )


def folder_upload_keys(folder_key: str, filenames: Sequence[str | None]) -> list[str]:
    """The storage key of each part named in ``filenames`` inside ``folder_key``,
    in order. Raises ``UploadRefused`` (or ``UnsafePath``) when a name is missing or
    unsafe, or when two parts would land on the same key or one inside the other."""
    check_part_count(len(filenames))
    keys: list[str] = []
    for filename in filenames:
        if not filename:
            raise UploadRefused(
                f"a part of the multipart field {UPLOAD_FIELD!r} has no file name: "
                "the file name names the stored file"
            )
        keys.append(child_key(folder_key, filename))
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise UploadRefused(
                f"two parts of the request are named {key[len(folder_key) + 1 :]!r}"
            )
        seen.add(key)
    for key in keys:
        segments = key.split("/")
        for depth in range(len(folder_key.split("/")) + 1, len(segments)):
            if "/".join(segments[:depth]) in seen:
                raise UploadRefused(
                    f"part {key[len(folder_key) + 1 :]!r} would be inside the file of another part"
                )
    return keys


def _as_key(key: str, _type: EntryType) -> str:
    return key


def check_parents(
    storage: Storage,
    key: str,
    *,
    first_checked_depth: int = 2,
    display: Callable[[str, EntryType], str] = _as_key,
) -> None:
    """Refuse ``key`` when a file is where one of its folders would be. Folders
    above ``first_checked_depth`` segments (a user's root and area by default) are
    not looked at; ``display`` names a key in the message (the key itself by
    default)."""
    segments = key.split("/")
    for depth in range(first_checked_depth, len(segments)):
        ancestor = "/".join(segments[:depth])
        entry = storage.stat(ancestor)
        if entry is None:
            return
        if entry.type is EntryType.FILE:
            raise Conflict(f"{display(ancestor, EntryType.FILE)!r} is a file, not a folder")


def check_file_target(
    storage: Storage,
    key: str,
    *,
    first_checked_depth: int = 2,
    display: Callable[[str, EntryType], str] = _as_key,
) -> None:
    """Refuse ``key`` when a folder is there (a file cannot replace it) or a file
    is where one of its folders would be (``check_parents``)."""
    existing = storage.stat(key)
    if existing is not None and existing.type is EntryType.DIRECTORY:
        raise Conflict(
            f"{display(key, EntryType.DIRECTORY)!r} is a folder; a file cannot replace it"
        )
    check_parents(storage, key, first_checked_depth=first_checked_depth, display=display)
