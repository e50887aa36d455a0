"""Routes through which workers move the files of the jobs they hold, and the
signed routes that need no bearer token (the signature is the credential).

The upload routes read the request body only after the caller is authorised (token
and lease, or signature), so an unauthorised caller cannot make the server spool a
large body; and they do not keep a database transaction open while a file streams
in (on SQLite that would hold the write lock for the whole upload).
"""

from __future__ import annotations

from typing import Annotated, Any, cast

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response, UploadFile, status
from pydantic import BaseModel
from starlette.datastructures import UploadFile as StarletteUploadFile

from labcloud.contract import OutputKind, SignedRequest
from labcloud.db import unit_of_work
from labcloud.errors import BadRequest
from labcloud.storage import Entry, Storage, TransferPurpose
from labcloud.storage.http import download_response, store_upload
from worker_api.dependencies import (
    CurrentWorker,
    FileServiceDep,
    SignerDep,
    StorageDep,
    make_file_service,
)

router = APIRouter(tags=["files"])

KindQuery = Annotated[OutputKind, Query(alias="type", description="output, log or artifact")]
BasePathQuery = Annotated[str, Query(description="Path of the file inside that folder.")]
UPLOAD_FIELD = "file"
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
    """A file written to storage."""

    path: str
    size: int


def held_upload_key(
    request: Request,
    queue_id: int,
    kind: KindQuery,
    base_path: BasePathQuery,
    worker: CurrentWorker,
) -> str:
    """Where the upload goes, checked in a transaction of its own that ends before
    the body is read."""
    with unit_of_work(request.app.state.session_factory) as session:
        return make_file_service(request, session).upload_key(
            queue_id, worker=worker.name, kind=kind, base_path=base_path
        )


async def receive_file(request: Request, storage: Storage, key: str) -> Entry:
    """Store the multipart field ``file`` of the request at ``key``."""
    async with request.form(max_files=1) as form:
        upload = form.get(UPLOAD_FIELD)
        # The form parser makes Starlette upload objects; FastAPI's class only adds
        # schema hooks to them, which store_upload does not use.
        if not isinstance(upload, StarletteUploadFile):
            raise BadRequest(f"send the file as the multipart field {UPLOAD_FIELD!r}")
        return await anyio.to_thread.run_sync(store_upload, storage, key, cast(UploadFile, upload))


@router.post(
    "/jobs/{queue_id}/files/url",
    status_code=status.HTTP_201_CREATED,
    response_model=SignedRequest,
)
def upload_url(
    queue_id: int,
    kind: KindQuery,
    base_path: BasePathQuery,
    worker: CurrentWorker,
    files: FileServiceDep,
) -> SignedRequest:
    """A short-lived request that uploads one result file of a job this worker holds
    (the worker adds the multipart field ``file``)."""
    return files.upload_request(queue_id, worker=worker.name, kind=kind, base_path=base_path)


@router.post(
    "/jobs/{queue_id}/files/upload",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_MULTIPART_BODY,
)
async def upload(
    request: Request,
    base_path: BasePathQuery,
    key: Annotated[str, Depends(held_upload_key)],
    storage: StorageDep,
) -> StoredFile:
    """Upload one result file of a job this worker holds (multipart field ``file``)."""
    entry = await receive_file(request, storage, key)
    return StoredFile(path=base_path, size=entry.size)


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
def signed_download(token: str, signer: SignerDep, storage: StorageDep) -> Response:
    """Download through a signed URL (no bearer token)."""
    return download_response(storage, signer.verify(token, TransferPurpose.DOWNLOAD))


@router.post("/_signed/{token}", status_code=status.HTTP_201_CREATED, openapi_extra=_MULTIPART_BODY)
async def signed_upload(
    request: Request, token: str, signer: SignerDep, storage: StorageDep
) -> StoredFile:
    """Upload through a signed URL (no bearer token; multipart field ``file``)."""
    key = signer.verify(token, TransferPurpose.UPLOAD)
    entry = await receive_file(request, storage, key)
    return StoredFile(path=key.rsplit("/", 1)[-1], size=entry.size)
