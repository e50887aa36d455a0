"""Writing files within an owner's storage limit.

Both APIs write into users' folders: the user API for uploads, the worker API for
jobs' results. Both hold the owner to the same limit, so the check lives here, next
to the storage, rather than in either service.

Where the bytes used come from is the caller's choice:

- a ``UsageLedger`` (the user API's ``storage_usage`` table, ``user_api.files.usage``)
  keeps a per-owner counter that writes reserve from and settle into atomically, so
  a check costs no listing of storage and two uploads cannot both take the last
  bytes; the ledger recounts from storage when bytes may have been written behind
  its back (presigned uploads, jobs' results);
- without one, the bytes are summed from storage on every check (``bytes_stored``),
  and the total is checked again after writing: the way a service without the
  counter (or code that has not been given it) still holds the limit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import BinaryIO, Protocol

from labcloud.errors import PayloadTooLarge
from labcloud.storage.base import Entry, EntryType, Storage
from labcloud.storage.paths import user_root_key

logger = logging.getLogger(__name__)


class StorageLimitReached(PayloadTooLarge):
    """Your storage limit is reached: delete files you no longer need."""


def bytes_stored(storage: Storage, subject: str) -> int:
    """The total size of the user's files, jobs' results included (a walk of the
    user's folder: one listing of their prefix on S3)."""
    return sum(entry.size for entry in storage.iter_files(user_root_key(subject)))


class UsageLedger(Protocol):
    """Bytes each owner's files take, kept where concurrent writers update them
    atomically. A write *reserves* what it may add before it starts and *settles*
    what it added when it ends; both are single guarded statements, never a read
    followed by a write."""

    def used(self, subject: str) -> int:
        """The bytes ``subject``'s files take (recounted from storage first when the
        count may miss bytes written outside the ledger)."""
        ...

    def reserve(self, subject: str, nbytes: int, limit: int | None, *, open_ended: bool) -> bool:
        """Count ``nbytes`` more (negative: fewer) for a write that starts, unless the
        total would then exceed ``limit`` (None: no limit; a reservation of zero or
        fewer bytes always passes). ``open_ended``: more bytes of unknown size follow,
        so the total must stay *below* the limit. False when refused (nothing
        counted)."""
        ...

    def grow(self, subject: str, nbytes: int, limit: int | None) -> bool:
        """Count ``nbytes`` more for a write in progress that turned out larger than
        it reserved, unless the total would then exceed ``limit``."""
        ...

    def settle(self, subject: str, reserved: int, written: int | None) -> int:
        """End a write that reserved ``reserved`` bytes: ``written`` bytes are what it
        changed in the end (None: unknown, the write failed part way; the count is
        then redone from storage at the next check). Returns the bytes used now."""
        ...

    def adjust(self, subject: str, delta: int) -> int:
        """Count ``delta`` bytes more (negative: fewer) for a change already made
        (a deletion); returns the bytes used now."""
        ...

    def expect_outside_writes(self, subject: str, *, expires_in: float) -> None:
        """Bytes of ``subject``'s may land in storage without passing through the
        ledger for the next ``expires_in`` seconds (a presigned upload URL was handed
        out): until then, and a while after, the count is taken from storage."""
        ...


def remaining_bytes(limit: int | None, used: int) -> int | None:
    """What may still be stored under ``limit`` (None: no limit), never negative."""
    return None if limit is None else max(0, limit - used)


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


def _replaced_bytes(storage: Storage, keys: Sequence[str]) -> int:
    """The size of the files the write will replace at ``keys``."""
    replaced = 0
    for key in set(keys):
        existing = storage.stat(key)
        if existing is not None and existing.type is EntryType.FILE:
            replaced += existing.size
    return replaced


def _refusal(used: int, limit: int, known: int, unknown: bool) -> StorageLimitReached:
    what = f"this upload of {_size(known)} " if not unknown else "this upload "
    return StorageLimitReached(
        f"storage limit reached: you store {_size(used)} of your limit of {_size(limit)}; "
        f"{what}would exceed it. Delete files you no longer need."
    )


def _not_kept(subject: str, entries: list[Entry], total: int, limit: int) -> StorageLimitReached:
    logger.info(
        "upload of %d file(s) for %s removed: %s over the limit of %s",
        len(entries),
        subject,
        total,
        limit,
    )
    written = sum(entry.size for entry in entries)
    return StorageLimitReached(
        f"storage limit reached: with this upload of {_size(written)} your files "
        f"would take {_size(total)}, over your limit of {_size(limit)}; "
        "the upload was not kept"
    )


def write_files_within_limit(
    storage: Storage,
    subject: str,
    files: Sequence[tuple[str, BinaryIO]],
    limit: int | None,
    *,
    usage: UsageLedger | None = None,
) -> list[Entry]:
    """Write each ``(key, stream)`` unless the user's files would then exceed
    ``limit`` bytes (None: no limit); files replaced at those keys no longer count.
    Raises ``StorageLimitReached`` naming the limit and the current use.

    With ``usage``, the bytes are reserved in the ledger before anything is written
    (so of two racing uploads only one can take the last bytes) and settled after.
    Without it they are summed from storage before writing and again after: two
    uploads racing each other may both pass the first check, and the one that finds
    the total over the limit afterwards removes what it wrote, so nothing stays over
    the limit."""
    if usage is not None:
        return _write_reserving(storage, subject, files, limit, usage)
    if limit is None:
        return [storage.write(key, stream) for key, stream in files]
    sizes = [stream_size(stream) for _, stream in files]
    known = sum(size for size in sizes if size is not None)
    unknown = any(size is None for size in sizes)
    replaced = _replaced_bytes(storage, [key for key, _ in files])
    used = bytes_stored(storage, subject)
    after = used - replaced + known
    if after > limit or (unknown and used >= limit):
        raise _refusal(used, limit, known, unknown)
    entries = [storage.write(key, stream) for key, stream in files]
    total = bytes_stored(storage, subject)
    if total > limit:
        # Only in a race with another upload, or a stream of unknown size: the
        # replaced files (if any) are gone either way, and the limit must hold.
        for entry in entries:
            storage.delete(entry.key)
        raise _not_kept(subject, entries, total, limit)
    return entries


def _write_reserving(
    storage: Storage,
    subject: str,
    files: Sequence[tuple[str, BinaryIO]],
    limit: int | None,
    usage: UsageLedger,
) -> list[Entry]:
    sizes = [stream_size(stream) for _, stream in files]
    known = sum(size for size in sizes if size is not None)
    unknown = any(size is None for size in sizes)
    replaced = _replaced_bytes(storage, [key for key, _ in files])
    reserved = known - replaced
    if not usage.reserve(subject, reserved, limit, open_ended=unknown):
        assert limit is not None  # an unlimited reservation is never refused
        raise _refusal(usage.used(subject), limit, known, unknown)
    entries: list[Entry] = []
    try:
        entries = [storage.write(key, stream) for key, stream in files]
    except BaseException:
        # Some files may be written (and others replaced): the count is redone.
        usage.settle(subject, reserved, None)
        raise
    written = sum(entry.size for entry in entries) - replaced
    if written > reserved and not usage.grow(subject, written - reserved, limit):
        # Only a stream of unknown (or wrongly told) size gets here: what it wrote
        # does not fit, and the files it replaced are gone either way.
        assert limit is not None
        for entry in entries:
            storage.delete(entry.key)
        total = usage.settle(subject, reserved, -replaced)
        raise _not_kept(subject, entries, total + sum(entry.size for entry in entries), limit)
    usage.settle(subject, max(reserved, written), written)
    return entries
