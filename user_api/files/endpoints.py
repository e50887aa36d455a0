"""Files routes of the user API (contract section 1) and the signed transfer routes.

Route order matters: ``{path:path}`` also matches ``.../download`` and ``.../url``,
so those routes come before the plain listing, and among the POST routes the
trailing-slash form (create a folder) is distinct from ``/upload`` and ``/url``.
The ``/_signed/{token}`` routes take no bearer token: the signature is the
credential. Storage calls block: the routes are sync, except the uploads, which
read their body on the event loop after the caller is authorised
(``labcloud.storage.http.received_files``) and store it from a worker thread.
None keeps a database transaction open while a file moves (on SQLite that would
hold the write lock for the whole transfer): the caller is read in a short
transaction of its own (``CurrentUserOutsideTransactions``), and so is anything
else a route asks the database.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import anyio.to_thread
from fastapi import APIRouter, Request, Response, status

from labcloud.contract import SignedRequest
from labcloud.db import unit_of_work
from labcloud.settings import AuthMode
from labcloud.storage.http import (
    UploadLimit,
    download_response,
    multipart_upload_body,
    received_files,
    url_upload_limit,
)
from labcloud.storage.quota import StorageLimitReached
from labcloud.storage.uploads import MAX_UPLOAD_PARTS
from user_api.dependencies import (
    CurrentUserOutsideTransactions,
    SettingsDep,
    SignedUrlStorageDep,
    StorageDep,
    StorageUsageDep,
)
from user_api.files import service, signed
from user_api.files.schemas import FileInfo, RenamePayload, UploadedFiles
from user_api.limits import OwnerState, default_limits, owner_state
from user_api.settings import UserApiSettings

router = APIRouter(tags=["files"])

# The upload routes read their multipart body themselves (``received_files``),
# after the caller is authorised, straight into files storage keeps as they are.
_FILES_BODY = multipart_upload_body(
    f"One or more files (at most {MAX_UPLOAD_PARTS}); each part's file name, which "
    "may be a relative path, names the stored file."
)


def _within_storage_limit(max_bytes: int | None) -> UploadLimit | None:
    """Files over the whole storage limit are refused while they arrive (the limit
    less what the user stores already is checked once they are in)."""
    if max_bytes is None:
        return None

    def refusal(_received: int) -> StorageLimitReached:
        return StorageLimitReached(
            f"storage limit reached: this upload is larger than your whole storage limit "
            f"of {max_bytes:,} bytes; it was not kept"
        )

    return UploadLimit(max_bytes, refusal)


def _owner_lookup(request: Request, settings: UserApiSettings) -> Callable[[str], OwnerState]:
    """The state of a signed URL's owner, read in a short transaction of its own
    (the signed routes keep none open while files move)."""
    defaults = default_limits(settings)
    local_auth = settings.auth is AuthMode.LOCAL

    def lookup(subject: str) -> OwnerState:
        with unit_of_work(request.app.state.session_factory) as session:
            return owner_state(session, subject, defaults, local_auth=local_auth)

    return lookup


def _job_named(request: Request) -> service.JobNamed:
    return service.job_name_lookup(request.app.state.session_factory)


_DOWNLOAD_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "The file, or a folder as a ZIP archive, streamed.",
        "content": {"application/octet-stream": {}, "application/zip": {}},
    }
}


@router.get("/files/{path:path}/download", response_class=Response, responses=_DOWNLOAD_RESPONSES)
def download_file(path: str, user: CurrentUserOutsideTransactions, storage: StorageDep) -> Response:
    """Download a file; a folder comes as a ZIP archive."""
    target = service.download_target(storage, user.subject, path)
    return download_response(storage, target.key, filename=target.filename)


@router.get("/files/{path:path}/url")
def get_download_url(
    path: str,
    user: CurrentUserOutsideTransactions,
    storage: StorageDep,
    settings: SettingsDep,
) -> SignedRequest:
    """A short-lived request that downloads a file or folder without the bearer token."""
    return service.download_url(
        storage, user.subject, path, expires_in=settings.signed_url_expiry_seconds
    )


@router.get("/files/{path:path}")
def list_files(
    path: str,
    user: CurrentUserOutsideTransactions,
    storage: StorageDep,
    show_dirs: bool = True,
    recursive: bool = False,
) -> list[FileInfo]:
    """List a folder ("" or "/" for the areas), or the file a path names."""
    return service.list_files(storage, user.subject, path, show_dirs=show_dirs, recursive=recursive)


# The second route uploads into an area's top folder (``/files/data/upload``).
@router.post(
    "/files/{type}/{path:path}/upload",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_FILES_BODY,
)
@router.post(
    "/files/{type}/upload",
    status_code=status.HTTP_201_CREATED,
    include_in_schema=False,
    openapi_extra=_FILES_BODY,
)
async def upload_file(
    request: Request,
    type: str,
    user: CurrentUserOutsideTransactions,
    storage: StorageDep,
    usage: StorageUsageDep,
    path: str = "",
) -> UploadedFiles:
    """Upload files into the folder ``<type>/<path>/``, each under its own name;
    ``type`` is config, data or artifact. Several parts in the field ``file`` are
    all stored (a folder upload) or, if one is refused, none."""
    max_bytes = user.limits.max_storage_bytes
    async with received_files(request, storage, limit=_within_storage_limit(max_bytes)) as parts:
        store = partial(
            service.upload_files,
            storage,
            user.subject,
            type,
            path,
            parts,
            job_named=_job_named(request),
            max_bytes=max_bytes,
            usage=usage,
        )
        return await anyio.to_thread.run_sync(store)


@router.post("/files/{type}/{path:path}/url", status_code=status.HTTP_201_CREATED)
@router.post("/files/{type}/url", status_code=status.HTTP_201_CREATED, include_in_schema=False)
def get_upload_url(
    request: Request,
    type: str,
    user: CurrentUserOutsideTransactions,
    storage: StorageDep,
    settings: SettingsDep,
    usage: StorageUsageDep,
    path: str = "",
) -> SignedRequest:
    """A short-lived POST, good for one upload, that stores files (multipart field
    ``file``) in ``<type>/<path>/`` without the bearer token."""
    return service.upload_url(
        storage,
        user.subject,
        type,
        path,
        expires_in=settings.signed_url_expiry_seconds,
        max_bytes=user.limits.max_storage_bytes,
        job_named=_job_named(request),
        usage=usage,
    )


@router.post("/files/{type}/{path:path}/", status_code=status.HTTP_201_CREATED)
def create_folder(
    request: Request,
    type: str,
    path: str,
    user: CurrentUserOutsideTransactions,
    storage: StorageDep,
) -> FileInfo:
    """Create the folder ``<type>/<path>/`` and its parents."""
    return service.make_folder(storage, user.subject, type, path, job_named=_job_named(request))


@router.put("/files/{path:path}")
def rename_file(
    request: Request,
    path: str,
    payload: RenamePayload,
    user: CurrentUserOutsideTransactions,
    storage: StorageDep,
) -> FileInfo:
    """Rename a file or an empty folder."""
    return service.rename(storage, user.subject, path, payload.path, job_named=_job_named(request))


@router.delete("/files/{path:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete_file(
    path: str, user: CurrentUserOutsideTransactions, storage: StorageDep, usage: StorageUsageDep
) -> None:
    """Delete a file or a folder with everything in it; 404 when nothing is there."""
    service.delete(storage, user.subject, path, usage=usage)


@router.get("/_signed/{token}", response_class=Response, responses=_DOWNLOAD_RESPONSES)
def signed_download(
    request: Request, token: str, storage: SignedUrlStorageDep, settings: SettingsDep
) -> Response:
    """Download through a signed URL, while its owner's account is active."""
    target = signed.signed_download_target(
        storage, token, owner_of=_owner_lookup(request, settings)
    )
    return download_response(storage, target.key, filename=target.filename)


@router.post("/_signed/{token}", status_code=status.HTTP_201_CREATED, openapi_extra=_FILES_BODY)
async def signed_upload(
    request: Request,
    token: str,
    storage: SignedUrlStorageDep,
    settings: SettingsDep,
) -> UploadedFiles:
    """Upload through a signed URL, once (multipart field ``file``, each part's file
    name names its file), while its owner's account is active."""
    owner_of = _owner_lookup(request, settings)
    # Checked before the body is read: a bad link costs the server no upload.
    transfer = await anyio.to_thread.run_sync(
        partial(signed.check_signed_upload, storage, token, owner_of=owner_of)
    )
    limit = url_upload_limit(transfer.max_bytes)
    async with received_files(request, storage, limit=limit) as parts:
        store = partial(
            signed.signed_upload,
            storage,
            token,
            parts,
            owner_of=owner_of,
            session_factory=request.app.state.session_factory,
            job_named=_job_named(request),
        )
        return await anyio.to_thread.run_sync(store)
