"""Routes through which workers move the files of the jobs they hold, and the
signed routes that need no bearer token (the signature is the credential).

The upload routes read the request body only after the caller is authorised (token
and lease, or signature), so an unauthorised caller cannot make the server spool a
large body; and they do not keep a database transaction open while a file streams
in (on SQLite that would hold the write lock for the whole upload).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel
from starlette.datastructures import UploadFile as StarletteUploadFile

from labcloud.contract import OutputKind, SignedRequest
from labcloud.db import unit_of_work
from labcloud.errors import BadRequest
from labcloud.storage import Entry, normalise_path
from labcloud.storage.http import download_response
from labcloud.storage.uploads import MAX_UPLOAD_PARTS, UPLOAD_FIELD, check_part_count
from worker_api.clients.accounts import AccountChecker
from worker_api.dependencies import (
    CurrentWorker,
    FileServiceDep,
    StorageDep,
    make_file_service,
)
from worker_api.files.service import IncomingFile, SignedTransfers, store_results

router = APIRouter(tags=["files"])

KindQuery = Annotated[OutputKind, Query(alias="type", description="output, log or artifact")]
BasePathQuery = Annotated[
    str,
    Query(
        description="The folder, under the job's location of that type, that the "
        "files go into ('' for the location itself); each file is named by its "
        "multipart part's file name."
    ),
]
# The body these routes read themselves, described for the OpenAPI document.
_MULTIPART_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [UPLOAD_FIELD],
                    "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


class StoredFile(BaseModel):
    """A file written to storage; ``path`` is relative to the job's location of
    that type."""

    path: str
    size: int


class StoredFiles(BaseModel):
    """What an upload stored: ``path`` and ``size`` are those of the file when one
    was sent (of the folder, and the bytes in all, for several); ``files`` lists
    each."""

    path: str
    size: int
    files: list[StoredFile]


def held_upload_folder(
    request: Request,
    queue_id: int,
    kind: KindQuery,
    worker: CurrentWorker,
    base_path: BasePathQuery = "",
) -> str:
    """Where the upload goes, checked in a transaction of its own that ends before
    the body is read."""
    with unit_of_work(request.app.state.session_factory) as session:
        return make_file_service(request, session).upload_folder(
            queue_id, worker=worker.name, kind=kind, base_path=base_path
        )


def _accounts(request: Request) -> AccountChecker:
    checker: AccountChecker = request.app.state.account_checker
    return checker


def _signed_transfers(request: Request) -> SignedTransfers:
    state = request.app.state
    return SignedTransfers(state.signer, state.storage, _accounts(request), state.session_factory)


SignedTransfersDep = Annotated[SignedTransfers, Depends(_signed_transfers)]


def _stored(folder_key: str, entries: list[Entry], *, folder: str = "") -> StoredFiles:
    """The response for ``entries`` stored in ``folder_key``; paths are relative to
    the job's location when ``folder`` (its path there) is given, else to
    ``folder_key``."""

    def path_of(key: str) -> str:
        return "/".join(part for part in (folder, key[len(folder_key) + 1 :]) if part)

    files = [StoredFile(path=path_of(entry.key), size=entry.size) for entry in entries]
    if len(files) == 1:
        return StoredFiles(path=files[0].path, size=files[0].size, files=files)
    return StoredFiles(path=folder, size=sum(f.size for f in files), files=files)


async def receive_files(
    request: Request, store: Callable[[list[IncomingFile]], list[Entry]]
) -> list[Entry]:
    """Parse the multipart body (at most ``MAX_UPLOAD_PARTS`` files) and hand every
    ``file`` part to ``store``, in a worker thread."""
    async with request.form(max_files=MAX_UPLOAD_PARTS, max_fields=MAX_UPLOAD_PARTS) as form:
        parts = form.getlist(UPLOAD_FIELD)
        check_part_count(len(parts))
        incoming: list[IncomingFile] = []
        for part in parts:
            if not isinstance(part, StarletteUploadFile):
                raise BadRequest(f"the multipart field {UPLOAD_FIELD!r} must carry files")
            part.file.seek(0)
            incoming.append(IncomingFile(part.filename, part.file))
        return await anyio.to_thread.run_sync(store, incoming)


@router.post(
    "/jobs/{queue_id}/files/url",
    status_code=status.HTTP_201_CREATED,
    response_model=SignedRequest,
)
def upload_url(
    queue_id: int,
    kind: KindQuery,
    worker: CurrentWorker,
    files: FileServiceDep,
    base_path: BasePathQuery = "",
) -> SignedRequest:
    """A short-lived request, good for one upload, that stores result files of a
    job this worker holds in the folder ``base_path`` (the worker adds the multipart
    field ``file``; each part's file name names its file)."""
    return files.upload_request(queue_id, worker=worker.name, kind=kind, base_path=base_path)


@router.post(
    "/jobs/{queue_id}/files/upload",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_MULTIPART_BODY,
)
async def upload(
    request: Request,
    folder: Annotated[str, Depends(held_upload_folder)],
    storage: StorageDep,
    base_path: BasePathQuery = "",
) -> StoredFiles:
    """Upload result files of a job this worker holds into the folder ``base_path``
    (multipart field ``file``; each part's file name names its file)."""
    accounts = _accounts(request)
    entries = await receive_files(
        request, lambda parts: store_results(storage, accounts, folder, parts)
    )
    return _stored(folder, entries, folder=normalise_path(base_path))


@router.get("/files/{uri:path}/url", response_model=SignedRequest)
def download_url(uri: str, worker: CurrentWorker, files: FileServiceDep) -> SignedRequest:
    """A short-lived request that downloads an input of a job this worker holds."""
    return files.download_request(uri, worker=worker.name)


@router.get("/files/{uri:path}/download")
def download(
    uri: str, worker: CurrentWorker, files: FileServiceDep, storage: StorageDep
) -> Response:
    """An input of a job this worker holds, streamed."""
    return download_response(storage, files.input_key(uri, worker=worker.name))


@router.get("/_signed/{token}")
def signed_download(token: str, transfers: SignedTransfersDep, storage: StorageDep) -> Response:
    """Download through a signed URL (no bearer token)."""
    return download_response(storage, transfers.download_key(token))


@router.post("/_signed/{token}", status_code=status.HTTP_201_CREATED, openapi_extra=_MULTIPART_BODY)
async def signed_upload(request: Request, token: str) -> StoredFiles:
    """Upload through a signed URL, once (no bearer token; multipart field ``file``,
    each part's file name names its file)."""
    transfers = _signed_transfers(request)
    # Checked before the body is read (the account check may block on HTTP).
    folder = await anyio.to_thread.run_sync(transfers.check_upload, token)
    entries = await receive_files(request, lambda parts: transfers.upload(token, parts))
    return _stored(folder, entries)
