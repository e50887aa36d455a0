"""Stream a folder as a ZIP archive without holding it in memory.

``zipfile.ZipFile`` writes into a sink that cannot seek, so each entry gets a data
descriptor after its data instead of a header patched afterwards, and the bytes
already written can be handed to the client and forgotten. Files are read in
``CHUNK_SIZE`` pieces; memory stays around two chunks whatever the folder holds.
"""

from __future__ import annotations

import io
import logging
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from labcloud.errors import NotFound
from labcloud.storage.base import CHUNK_SIZE, Storage
from labcloud.storage.paths import check_key

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

logger = logging.getLogger(__name__)

# Entries at least this large are written with ZIP64 headers from the start: with an
# unseekable sink a header cannot be rewritten if a file outgrows the 4 GiB limit.
ZIP64_THRESHOLD = zipfile.ZIP64_LIMIT // 2
# Whether a file is DEFLATEd is decided from a sample of its start: measurement data
# (camera frames, compressed images, model weights) barely compresses, and
# deflating it costs about 20 times the time of storing it for an archive no
# smaller. Text, CSV and logs shrink by half or more, so they still are deflated.
SAMPLE_SIZE = 64 * 1024
# Deflate only when the sample shrinks to this share of its size or less.
DEFLATE_BELOW = 0.9
# Fast deflate: most of the saving on text at a fraction of the default's time.
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


def _read_sample(source: BinaryIO) -> bytes:
    """Up to ``SAMPLE_SIZE`` bytes from the start (a stream may return less per read)."""
    parts: list[bytes] = []
    size = 0
    while size < SAMPLE_SIZE and (part := source.read(SAMPLE_SIZE - size)):
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def compression_for(sample: bytes) -> int:
    """``ZIP_DEFLATED`` when ``sample`` compresses usefully, else ``ZIP_STORED``."""
    if not sample:
        return zipfile.ZIP_STORED
    deflated = len(zlib.compress(sample, COMPRESS_LEVEL))
    return zipfile.ZIP_DEFLATED if deflated <= DEFLATE_BELOW * len(sample) else zipfile.ZIP_STORED


def _entry_info(
    arcname: str, date_time: tuple[int, int, int, int, int, int], size: int, compression: int
) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=date_time)
    info.compress_type = compression
    # An entry opened from a ZipInfo takes its level from it, not from the archive
    # (without this, zipfile deflates at zlib's default level 6).
    if sys.version_info >= (3, 13):
        info.compress_level = COMPRESS_LEVEL
    else:
        info._compresslevel = COMPRESS_LEVEL  # type: ignore[attr-defined]
    info.external_attr = _FILE_ATTRIBUTES
    info.file_size = size
    return info


def zip_stream(storage: Storage, key: str, *, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield a ZIP archive of every file under the folder ``key``, with names
    relative to it, in chunks of about ``chunk_size`` bytes (the last may be
    shorter). Each file is stored or deflated as a sample of its start says
    (``compression_for``). Blocking: iterate it in a worker thread."""
    folder = check_key(key)
    sink = _Sink()
    with zipfile.ZipFile(sink, mode="w") as archive:
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
            with source:
                sample = _read_sample(source)
                info = _entry_info(
                    arcname,
                    _date_time(storage, entry.key),
                    entry.size,
                    compression_for(sample),
                )
                zip64 = entry.size >= ZIP64_THRESHOLD
                with archive.open(info, mode="w", force_zip64=zip64) as target:
                    target.write(sample)
                    if (chunk := sink.take(chunk_size)) is not None:
                        yield chunk
                    while data := source.read(chunk_size):
                        target.write(data)
                        if (chunk := sink.take(chunk_size)) is not None:
                            yield chunk
            # Many files smaller than a chunk must not pile up in the sink either.
            if (chunk := sink.take(chunk_size)) is not None:
                yield chunk
    if (chunk := sink.take()) is not None:
        yield chunk
