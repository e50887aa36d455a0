"""HTTP glue for storage: stream a file or a zipped folder out, receive an upload.

Used by both APIs' download and upload routes, including the signed ones.
``download_response`` blocks (file system, network); call it from sync endpoints.

``received_files`` reads a multipart body itself instead of leaving it to the form
parser of Starlette, which spools each file to a temporary file (one thread hop per
chunk received) that storage then copies again. Here each file part goes once, in
batches written from a worker thread while the next bytes arrive (``writev`` of the
chunks as received: no copy to join them), into a file the storage can take as it
is: a local storage's staged file, renamed to its key
(``LocalStorage.staging_file``), or a temporary file for any other storage. A
limit on the bytes of all files refuses the upload as soon as it is passed, while
the body is still arriving. Uploads are written by
``labcloud.storage.quota.write_files_within_limit``, within the owner's limit.
Measured with ``bench/transfer.py`` (``bench/README.md``, "transfers of one large
file"): uploads twice as fast as through the spooled file, downloads sent three
times as fast, with a flat memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import mimetypes
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote

import anyio.to_thread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse

from labcloud.errors import LabCloudError, NotFound
from labcloud.storage.base import CHUNK_SIZE, EntryType, Storage
from labcloud.storage.local import LocalStorage, StagedFile
from labcloud.storage.transfers import UploadTooLarge
from labcloud.storage.uploads import (
    MAX_UPLOAD_PARTS,
    UPLOAD_FIELD,
    IncomingFile,
    UploadRefused,
    check_part_count,
)
from labcloud.storage.zipstream import zip_stream

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# Bytes of a file part collected before one write (from a worker thread): enough
# to keep the thread hops few (2,048 per GiB), little enough that the bytes are
# still in the CPU's caches when they are written. 1 GiB uploads here, three each:
# 412-443 MiB/s with 4 MiB, 387-682 with 1 MiB, 612-693 with 512 KiB.
UPLOAD_WRITE_SIZE = 512 * 1024
# Bytes one download reads and sends at a time: Starlette's FileResponse reads
# 64 KiB per thread hop, and sent 1 GiB at 386-581 MiB/s here; with 1 MiB,
# 949-2,109 MiB/s (bench/transfer.py, to /dev/null).
DOWNLOAD_CHUNK_SIZE = 1024 * 1024
# The threads that write uploads: each upload has at most one write in flight, so
# that it receives the next bytes while the last are written.
_WRITERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="upload-write")
# A part's headers and a form field that is not a file are small; an upload that
# sends more is refused rather than held in memory.
_MAX_HEADER_BYTES = 16 * 1024
_MAX_FIELD_BYTES = 64 * 1024


def content_disposition(filename: str) -> str:
    """An ``attachment`` header value; names that are not plain ASCII go in the
    RFC 5987 ``filename*`` form, as Starlette's ``FileResponse`` does."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


class _LargeChunkFileResponse(FileResponse):
    """``FileResponse`` reading ``DOWNLOAD_CHUNK_SIZE`` per thread hop."""

    chunk_size = DOWNLOAD_CHUNK_SIZE


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(CHUNK_SIZE):
            yield chunk


def download_response(storage: Storage, key: str, *, filename: str | None = None) -> Response:
    """The file at ``key`` as an attachment (sent with sendfile when the storage is
    local), or the folder at ``key`` as a streamed ``<name>.zip``. ``filename``
    replaces the key's last segment as the name offered to the client."""
    entry = storage.stat(key)
    if entry is None:
        raise NotFound(f"no file or folder at {key!r}")
    name = filename or PurePosixPath(key).name
    if entry.type is EntryType.DIRECTORY:
        return StreamingResponse(
            zip_stream(storage, key),
            media_type="application/zip",
            headers={"Content-Disposition": content_disposition(f"{name}.zip")},
        )
    local = storage.local_path(key)
    if local is not None:
        return _LargeChunkFileResponse(local, filename=name)
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return StreamingResponse(
        _chunks(storage.open_read(key)),
        media_type=media_type,
        headers={
            "Content-Disposition": content_disposition(name),
            "Content-Length": str(entry.size),
        },
    )


def multipart_upload_body(description: str) -> dict[str, object]:
    """The OpenAPI ``requestBody`` of a route that reads its files with
    ``received_files`` (FastAPI cannot see a body the route reads itself); for
    ``openapi_extra``."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [UPLOAD_FIELD],
                        "properties": {
                            UPLOAD_FIELD: {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": description,
                            }
                        },
                    }
                }
            },
        }
    }


@dataclass(frozen=True, slots=True)
class UploadLimit:
    """At most ``max_bytes`` of file content in one upload; ``refusal(received)``
    is the error raised as soon as more arrives."""

    max_bytes: int
    refusal: Callable[[int], LabCloudError]


def url_upload_limit(max_bytes: int | None) -> UploadLimit | None:
    """The limit of an upload through a signed URL that caps it at ``max_bytes``
    (None: no cap): ``UploadTooLarge`` as soon as more arrives."""
    if max_bytes is None:
        return None

    def refusal(_received: int) -> UploadTooLarge:
        return UploadTooLarge(
            f"this upload is larger than the {max_bytes:,} bytes its upload URL allows"
        )

    return UploadLimit(max_bytes, refusal)


def _staging_file(storage: Storage) -> BinaryIO:
    if isinstance(storage, LocalStorage):
        return storage.staging_file()
    return tempfile.TemporaryFile()


def _discard(file: BinaryIO) -> None:
    if isinstance(file, StagedFile):
        file.discard()
    else:
        file.close()


def _discard_all(files: list[BinaryIO], pending: concurrent.futures.Future[None] | None) -> None:
    """Remove ``files`` once the write in flight to one of them has ended."""
    if pending is not None:
        concurrent.futures.wait([pending])
    for file in files:
        _discard(file)


def _decode(raw: bytes) -> str:
    """A header parameter as browsers and curl send it (UTF-8), else Latin-1 (as
    Starlette's form parser reads it)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _Part:
    """The part being received: its headers, then its file (or a small field)."""

    def __init__(self) -> None:
        self.header_bytes = 0
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.disposition = b""
        self.file: BinaryIO | None = None
        self.filename: str | None = None
        self.field_bytes = 0
        # The part's bytes not yet written: the chunks as received where a chunk is
        # all file content (no copy), slices of it elsewhere.
        self.pieces: list[bytes] = []
        self.buffered = 0


class _MultipartReceiver:
    """Callbacks of python-multipart's parser: file parts of the field ``file`` are
    collected until they hold ``UPLOAD_WRITE_SIZE`` bytes, which ``flush`` writes."""

    def __init__(self, storage: Storage, limit: UploadLimit | None) -> None:
        self.storage = storage
        self.limit = limit
        self.files: list[tuple[str | None, BinaryIO]] = []
        self.opened: list[BinaryIO] = []
        self.part = _Part()
        # The write in flight, if any (one at a time, in order).
        self.pending: concurrent.futures.Future[None] | None = None
        # Parts ended by the last chunk whose bytes are not yet written.
        self.ended_parts: list[_Part] = []
        self.in_part = False
        self.ended = False
        self.received = 0
        self.parts = 0

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def _count_header(self, count: int) -> None:
        self.part.header_bytes += count
        if self.part.header_bytes > _MAX_HEADER_BYTES:
            raise UploadRefused(
                f"the headers of a multipart part are over {_MAX_HEADER_BYTES:,} bytes"
            )

    def on_part_begin(self) -> None:
        self.part = _Part()
        self.in_part = True

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.part.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self.part.header_name).lower() == b"content-disposition":
            self.part.disposition = bytes(self.part.header_value)
        self.part.header_name.clear()
        self.part.header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        name = options.get(b"name")
        if name is None:
            raise UploadRefused("a multipart part has no name (Content-Disposition: name=...)")
        self.parts += 1
        if self.parts > 2 * MAX_UPLOAD_PARTS:
            raise UploadRefused(f"too many parts: send at most {MAX_UPLOAD_PARTS} files")
        if _decode(name) != UPLOAD_FIELD:
            return
        if b"filename" not in options:
            raise UploadRefused(f"the multipart field {UPLOAD_FIELD!r} must carry files")
        check_part_count(len(self.files) + 1)
        self.part.filename = _decode(options[b"filename"])
        self.part.file = _staging_file(self.storage)
        self.opened.append(self.part.file)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        count = end - start
        if self.part.file is None:
            self.part.field_bytes += count
            if self.part.field_bytes > _MAX_FIELD_BYTES:
                raise UploadRefused(
                    f"a form field other than {UPLOAD_FIELD!r} is over {_MAX_FIELD_BYTES:,} bytes"
                )
            return
        self.received += count
        if self.limit is not None and self.received > self.limit.max_bytes:
            raise self.limit.refusal(self.received)
        self.part.pieces.append(data if start == 0 and end == len(data) else data[start:end])
        self.part.buffered += count

    def on_part_end(self) -> None:
        self.in_part = False
        if self.part.file is not None:
            self.files.append((self.part.filename, self.part.file))
            self.ended_parts.append(self.part)

    def on_end(self) -> None:
        self.ended = True

    async def flush(self) -> None:
        """Write the bytes of the parts that ended, and the current part's once
        it holds ``UPLOAD_WRITE_SIZE`` bytes."""
        ended, self.ended_parts = self.ended_parts, []
        for part in ended:
            await self._write(part)
        if self.part.buffered >= UPLOAD_WRITE_SIZE:
            await self._write(self.part)

    async def _write(self, part: _Part) -> None:
        """Start writing the part's bytes once the write in flight is done."""
        if part.file is None or not part.pieces:
            return
        pieces, part.pieces, part.buffered = part.pieces, [], 0
        await self.written()
        self.pending = _WRITERS.submit(_write_pieces, part.file.fileno(), pieces)

    async def written(self) -> None:
        """Wait for the write in flight (raising its error)."""
        if self.pending is not None:
            await asyncio.wrap_future(self.pending)
            self.pending = None


# Buffers per writev call, well under any system's IOV_MAX (1024 on Linux).
_WRITEV_BATCH = 256


def _write_pieces(descriptor: int, pieces: list[bytes]) -> None:
    """Write ``pieces`` in order at the descriptor's position, with ``writev``
    (no copy to join them); a short write goes on where it stopped."""
    views = [memoryview(piece) for piece in pieces if piece]
    while views:
        batch = views[:_WRITEV_BATCH]
        written = os.writev(descriptor, batch)
        done = 0
        while done < len(batch) and written >= len(batch[done]):
            written -= len(batch[done])
            done += 1
        views = views[done:]
        if written:
            views[0] = views[0][written:]


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UploadRefused(f"send the files as multipart/form-data, in the field {UPLOAD_FIELD!r}")
    return boundary


@contextlib.asynccontextmanager
async def received_files(
    request: Request, storage: Storage, *, limit: UploadLimit | None = None
) -> AsyncIterator[list[IncomingFile]]:
    """Receive the multipart body of ``request``: every part of the field ``file``
    (at most ``MAX_UPLOAD_PARTS``) as an ``IncomingFile`` whose stream is at its
    start, for ``storage.write``. Form fields other than ``file`` are read and
    ignored. What was received and not stored is removed when the block ends.
    Raises ``UploadRefused`` for a body that is not such a form (or ends early),
    and ``limit``'s refusal when the files carry more than it allows."""
    receiver = _MultipartReceiver(storage, limit)
    try:
        parser = MultipartParser(_boundary(request), receiver.callbacks())
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise UploadRefused(f"the multipart body is malformed: {exc}") from None
            await receiver.flush()
        parser.finalize()
        if receiver.in_part or not receiver.ended:
            raise UploadRefused("the multipart body ends before its closing boundary")
        await receiver.written()
        check_part_count(len(receiver.files))
        for _, file in receiver.files:
            file.seek(0)
        yield [IncomingFile(filename, file) for filename, file in receiver.files]
    finally:
        opened = list(receiver.opened)
        if opened:
            await anyio.to_thread.run_sync(_discard_all, opened, receiver.pending)
