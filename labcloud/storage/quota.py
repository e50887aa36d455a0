"""Writing files within an owner's storage limit.

Both APIs write into users' folders: the user API for uploads, the worker API for
jobs' results. Both hold the owner to the same limit, so the check lives here, next
to the storage, rather than in either service.

Bytes stored are summed from storage on every check rather than kept in a counter:
nothing else could stay correct when two services (and several processes of each)
write to the same folders.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import BinaryIO

from labcloud.errors import PayloadTooLarge
from labcloud.storage.base import Entry, EntryType, Storage
from labcloud.storage.paths import user_root_key

logger = logging.getLogger(__name__)


class StorageLimitReached(PayloadTooLarge):
    """Your storage limit is reached: delete files you no longer need."""


def bytes_stored(storage: Storage, subject: str) -> int:
    """The total size of the user's files, jobs' results included."""
    return sum(entry.size for entry in storage.iter_files(user_root_key(subject)))


def _size(count: int) -> str:
    return f"{count:,} bytes"


def stream_size(stream: BinaryIO) -> int | None:
    """The bytes left in ``stream``, when it can tell without being read (an upload
    spooled by the form parser can); None otherwise."""
    try:
        if not stream.seekable():
            return None
        start = stream.tell()
        end = stream.seek(0, 2)
        stream.seek(start)
    except OSError:
        return None
    return end - start


def write_files_within_limit(
    storage: Storage,
    subject: str,
    files: Sequence[tuple[str, BinaryIO]],
    limit: int | None,
) -> list[Entry]:
    """Write each ``(key, stream)`` unless the user's files would then exceed
    ``limit`` bytes (None: no limit); files replaced at those keys no longer count.

    The sizes are checked before anything is written, and the total again after:
    two uploads racing each other may both pass the first check, and the one that
    finds the total over the limit afterwards removes what it wrote, so nothing
    stays over the limit. Raises ``StorageLimitReached`` naming the limit and the
    current use."""
    if limit is None:
        return [storage.write(key, stream) for key, stream in files]
    sizes = [stream_size(stream) for _, stream in files]
    known = sum(size for size in sizes if size is not None)
    unknown = any(size is None for size in sizes)
    replaced = 0
    for key in {key for key, _ in files}:
        existing = storage.stat(key)
        if existing is not None and existing.type is EntryType.FILE:
            replaced += existing.size
    used = bytes_stored(storage, subject)
    after = used - replaced + known
    if after > limit or (unknown and used >= limit):
        what = f"this upload of {_size(known)} " if not unknown else "this upload "
        raise StorageLimitReached(
            f"storage limit reached: you store {_size(used)} of your limit of {_size(limit)}; "
            f"{what}would exceed it. Delete files you no longer need."
        )
    entries = [storage.write(key, stream) for key, stream in files]
    total = bytes_stored(storage, subject)
    if total > limit:
        # Only in a race with another upload, or a stream of unknown size: the
        # replaced files (if any) are gone either way, and the limit must hold.
        for entry in entries:
            storage.delete(entry.key)
        logger.info(
            "upload of %d file(s) for %s removed: %s over the limit of %s",
            len(entries),
            subject,
            total,
            limit,
        )
        written = sum(entry.size for entry in entries)
        raise StorageLimitReached(
            f"storage limit reached: with this upload of {_size(written)} your files "
            f"would take {_size(total)}, over your limit of {_size(limit)}; "
            "the upload was not kept"
        )
    return entries
