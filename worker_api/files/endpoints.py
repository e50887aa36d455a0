"""Routes through which workers move the files of the jobs they hold, and the
signed routes that need no bearer token (the signature is the credential).

The upload routes read the request body only after the caller is authorised (token
and lease, or signature), so an unauthorised caller cannot make the server spool a
large body; and they do not keep a database transaction open while a file streams
in (on SQLite that would hold the write lock for the whole upload).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response, status

from labcloud.contract import OutputKind, SignedRequest
from labcloud.db import unit_of_work
from labcloud.storage import Entry, Storage, normalise_path
from labcloud.storage.http import (
    UploadLimit,
    download_response,
    multipart_upload_body,
    received_files,
    url_upload_limit,
)
from labcloud.storage.uploads import MAX_UPLOAD_PARTS, IncomingFile
from worker_api.dependencies import (
    AccountsDep,
    CurrentWorker,
    SessionDep,
    SettingsDep,
    SignedUrlStorageDep,
    StorageDep,
)
from worker_api.files import service, signed
from worker_api.files.schemas import StoredFiles, stored_files

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
_MULTIPART_BODY = multipart_upload_body(
    f"One or more files (at most {MAX_UPLOAD_PARTS}); each part's file name, which "
    "may be a relative path, names the stored file."
)


def held_upload_target(
    request: Request,
    queue_id: int,
    kind: KindQuery,
    worker: CurrentWorker,
    base_path: BasePathQuery = "",
) -> service.UploadTarget:
    """Where the upload goes, checked in a transaction of its own that ends before
    the body is read (or the owner's account is looked up)."""
    with unit_of_work(request.app.state.session_factory) as session:
        return service.upload_target(
            session, queue_id, worker=worker.name, kind=kind, base_path=base_path
        )


HeldUploadTarget = Annotated[service.UploadTarget, Depends(held_upload_target)]


async def receive_files(
    request: Request,
    storage: Storage,
    store: Callable[[list[IncomingFile]], list[Entry]],
    *,
    limit: UploadLimit | None = None,
) -> list[Entry]:
    """Receive the multipart body (at most ``MAX_UPLOAD_PARTS`` files, within
    ``limit``, see ``received_files``) and hand every ``file`` part to ``store``,
    in a worker thread."""
    async with received_files(request, storage, limit=limit) as parts:
        return await anyio.to_thread.run_sync(store, parts)


@router.post(
    "/jobs/{queue_id}/files/url",
    status_code=status.HTTP_201_CREATED,
    response_model=SignedRequest,
)
def upload_url(
    target: HeldUploadTarget,
    storage: StorageDep,
    accounts: AccountsDep,
    settings: SettingsDep,
) -> SignedRequest:
    """A short-lived request, good for one upload, that stores result files of a
    job this worker holds in the folder ``base_path`` (the worker adds the multipart
    field ``file``; each part's file name names its file)."""
    return service.upload_request(
        storage, accounts, target, expires_in=settings.signed_url_expiry_seconds
    )


@router.post(
    "/jobs/{queue_id}/files/upload",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_MULTIPART_BODY,
)
async def upload(
    request: Request,
    target: HeldUploadTarget,
    storage: StorageDep,
    accounts: AccountsDep,
    base_path: BasePathQuery = "",
) -> StoredFiles:
    """Upload result files of a job this worker holds into the folder ``base_path``
    (multipart field ``file``; each part's file name names its file)."""
    folder = target.folder_key
    entries = await receive_files(
        request, storage, lambda parts: service.store_results(storage, accounts, folder, parts)
    )
    return stored_files(folder, entries, folder=normalise_path(base_path))


@router.get("/files/{uri:path}/url", response_model=SignedRequest)
def download_url(
    uri: str,
    worker: CurrentWorker,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> SignedRequest:
    """A short-lived request that downloads an input of a job this worker holds."""
    return service.download_request(
        session, storage, uri, worker=worker.name, expires_in=settings.signed_url_expiry_seconds
    )


@router.get("/files/{uri:path}/download")
def download(uri: str, worker: CurrentWorker, session: SessionDep, storage: StorageDep) -> Response:
    """An input of a job this worker holds, streamed."""
    return download_response(storage, service.input_key(session, uri, worker=worker.name))


@router.get("/_signed/{token}")
def signed_download(token: str, storage: SignedUrlStorageDep, accounts: AccountsDep) -> Response:
    """Download through a signed URL (no bearer token)."""
    return download_response(storage, signed.download_key(storage, accounts, token))


@router.post("/_signed/{token}", status_code=status.HTTP_201_CREATED, openapi_extra=_MULTIPART_BODY)
async def signed_upload(
    request: Request, token: str, storage: SignedUrlStorageDep, accounts: AccountsDep
) -> StoredFiles:
    """Upload through a signed URL, once (no bearer token; multipart field ``file``,
    each part's file name names its file)."""
    # Checked before the body is read (the account check may block on HTTP).
    transfer = await anyio.to_thread.run_sync(signed.check_upload, storage, accounts, token)
    sessions = request.app.state.session_factory
    entries = await receive_files(
        request,
        storage,
        lambda parts: signed.upload(storage, accounts, sessions, token, parts),
        limit=url_upload_limit(transfer.max_bytes),
    )
    return stored_files(signed.upload_folder(transfer), entries)
