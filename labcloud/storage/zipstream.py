"""Stream a folder as a ZIP archive without holding it in memory.

``zipfile.ZipFile`` writes into a sink that cannot seek, so each entry gets a data
descriptor after its data instead of a header patched afterwards, and the bytes
already written can be handed to the client and forgotten. Files are read in
``CHUNK_SIZE`` pieces; memory stays around two chunks whatever the folder holds.
"""

from __future__ import annotations

import io
import logging
import time
import zipfile
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from labcloud.errors import NotFound
from labcloud.storage.base import CHUNK_SIZE, Storage
from labcloud.storage.paths import check_key

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

logger = logging.getLogger(__name__)

# Entries at least this large are written with ZIP64 headers from the start: with an
# unseekable sink a header cannot be rewritten if a file outgrows the 4 GiB limit.
ZIP64_THRESHOLD = zipfile.ZIP64_LIMIT // 2
# Fast deflate: archives of measurement data barely compress, text still shrinks.
COMPRESS_LEVEL = 1
_FILE_ATTRIBUTES = 0o100644 << 16


class _Sink(io.RawIOBase):
    """A write-only, unseekable buffer whose content is taken out as it fills."""

    def __init__(self) -> None:
        super().__init__()
        self._pending = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data)
        self._pending += view
        return view.nbytes

    def take(self, minimum: int = 0) -> bytes | None:
        """The pending bytes when there are at least ``minimum`` (and some)."""
        if not self._pending or len(self._pending) < minimum:
            return None
        data = bytes(self._pending)
        self._pending.clear()
        return data


def _date_time(storage: Storage, key: str) -> tuple[int, int, int, int, int, int]:
    local = storage.local_path(key)
    try:
        stamp = local.stat().st_mtime if local is not None else time.time()
    except FileNotFoundError:
        stamp = time.time()
    moment = time.localtime(stamp)
    if moment.tm_year < 1980:  # the earliest time a ZIP entry can carry
        return (1980, 1, 1, 0, 0, 0)
    return (
        moment.tm_year,
        moment.tm_mon,
        moment.tm_mday,
        moment.tm_hour,
        moment.tm_min,
        moment.tm_sec,
    )


def zip_stream(storage: Storage, key: str, *, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield a ZIP archive of every file under the folder ``key``, with names
    relative to it, in chunks of about ``chunk_size`` bytes (the last may be
    shorter). Blocking: iterate it in a worker thread."""
    folder = check_key(key)
    sink = _Sink()
    with zipfile.ZipFile(
        sink, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL
    ) as archive:
        for entry in storage.iter_files(folder):
            if entry.key == folder:
                arcname = PurePosixPath(folder).name
            else:
                arcname = entry.key.removeprefix(folder + "/")
            try:
                source = storage.open_read(entry.key)
            except NotFound:
                logger.warning("%s vanished while its folder was being zipped", entry.key)
                continue
            info = zipfile.ZipInfo(arcname, date_time=_date_time(storage, entry.key))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = _FILE_ATTRIBUTES
            info.file_size = entry.size
            with (
                source,
                archive.open(info, mode="w", force_zip64=entry.size >= ZIP64_THRESHOLD) as target,
            ):
                while data := source.read(chunk_size):
                    target.write(data)
                    if (chunk := sink.take(chunk_size)) is not None:
                        yield chunk
    if (chunk := sink.take()) is not None:
        yield chunk
