"""HTTP glue for storage: stream a file or a zipped folder out.

Used by both APIs' download routes, including the signed ones. (Uploads are written
by ``labcloud.storage.quota.write_files_within_limit``, within the owner's limit.)
The functions block (file system, network); call them from sync endpoints.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import BinaryIO
from urllib.parse import quote

from starlette.responses import FileResponse, Response, StreamingResponse

from labcloud.errors import NotFound
from labcloud.storage.base import CHUNK_SIZE, EntryType, Storage
from labcloud.storage.zipstream import zip_stream


def content_disposition(filename: str) -> str:
    """An ``attachment`` header value; names that are not plain ASCII go in the
    RFC 5987 ``filename*`` form, as Starlette's ``FileResponse`` does."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


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
        return FileResponse(local, filename=name)
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return StreamingResponse(
        _chunks(storage.open_read(key)),
        media_type=media_type,
        headers={
            "Content-Disposition": content_disposition(name),
            "Content-Length": str(entry.size),
        },
    )
