"""Files routes of the user API (contract section 1) and the signed transfer routes.

Route order matters: ``{path:path}`` also matches ``.../download`` and ``.../url``,
so those routes come before the plain listing, and among the POST routes the
trailing-slash form (create a folder) is distinct from ``/upload`` and ``/url``.
The ``/_signed/{token}`` routes take no bearer token: the signature is the
credential. All routes are sync: storage calls block.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, UploadFile, status

from labcloud.contract import SignedRequest
from labcloud.storage.http import download_response
from user_api.dependencies import CurrentUser, SessionDep, SettingsDep, SignerDep, StorageDep
from user_api.files import service
from user_api.files.schemas import FileInfo, RenamePayload
from user_api.limits import default_limits, storage_limit_lookup

router = APIRouter(tags=["files"])

_DOWNLOAD_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "The file, or a folder as a ZIP archive, streamed.",
        "content": {"application/octet-stream": {}, "application/zip": {}},
    }
}


@router.get("/files/{path:path}/download", response_class=Response, responses=_DOWNLOAD_RESPONSES)
def download_file(path: str, user: CurrentUser, storage: StorageDep) -> Response:
    """Download a file; a folder comes as a ZIP archive."""
    target = service.download_target(storage, user.subject, path)
    return download_response(storage, target.key, filename=target.filename)


@router.get("/files/{path:path}/url")
def get_download_url(
    path: str, user: CurrentUser, storage: StorageDep, signer: SignerDep, settings: SettingsDep
) -> SignedRequest:
    """A short-lived request that downloads a file or folder without the bearer token."""
    return service.download_url(
        storage,
        signer,
        user.subject,
        path,
        base_url=settings.public_url,
        expires_in=settings.signed_url_expiry_seconds,
    )


@router.get("/files/{path:path}")
def list_files(
    path: str,
    user: CurrentUser,
    storage: StorageDep,
    show_dirs: bool = True,
    recursive: bool = False,
) -> list[FileInfo]:
    """List a folder ("" or "/" for the areas), or the file a path names."""
    return service.list_files(storage, user.subject, path, show_dirs=show_dirs, recursive=recursive)


# The second route uploads into an area's top folder (``/files/data/upload``).
@router.post("/files/{type}/{path:path}/upload", status_code=status.HTTP_201_CREATED)
@router.post("/files/{type}/upload", status_code=status.HTTP_201_CREATED, include_in_schema=False)
def upload_file(
    type: str, file: UploadFile, user: CurrentUser, storage: StorageDep, path: str = ""
) -> FileInfo:
    """Upload a file into the folder ``<type>/<path>/`` under its own name;
    ``type`` is config, data or artifact."""
    return service.upload_file(
        storage,
        user.subject,
        type,
        path,
        filename=file.filename,
        stream=file.file,
        max_bytes=user.limits.max_storage_bytes,
    )


@router.post("/files/{type}/{path:path}/url", status_code=status.HTTP_201_CREATED)
@router.post("/files/{type}/url", status_code=status.HTTP_201_CREATED, include_in_schema=False)
def get_upload_url(
    type: str,
    user: CurrentUser,
    storage: StorageDep,
    signer: SignerDep,
    settings: SettingsDep,
    path: str = "",
) -> SignedRequest:
    """A short-lived POST that uploads one file (multipart field ``file``) into
    ``<type>/<path>/`` without the bearer token."""
    return service.upload_url(
        storage,
        signer,
        user.subject,
        type,
        path,
        base_url=settings.public_url,
        expires_in=settings.signed_url_expiry_seconds,
    )


@router.post("/files/{type}/{path:path}/", status_code=status.HTTP_201_CREATED)
def create_folder(type: str, path: str, user: CurrentUser, storage: StorageDep) -> FileInfo:
    """Create the folder ``<type>/<path>/`` and its parents."""
    return service.make_folder(storage, user.subject, type, path)


@router.put("/files/{path:path}")
def rename_file(
    path: str, payload: RenamePayload, user: CurrentUser, storage: StorageDep
) -> FileInfo:
    """Rename a file or an empty folder."""
    return service.rename(storage, user.subject, path, payload.path)


@router.delete("/files/{path:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete_file(path: str, user: CurrentUser, storage: StorageDep) -> None:
    """Delete a file or a folder with everything in it; idempotent."""
    service.delete(storage, user.subject, path)


@router.get("/_signed/{token}", response_class=Response, responses=_DOWNLOAD_RESPONSES)
def signed_download(token: str, storage: StorageDep, signer: SignerDep) -> Response:
    """Download through a signed URL."""
    target = service.signed_download_target(storage, signer, token)
    return download_response(storage, target.key, filename=target.filename)


@router.post("/_signed/{token}", status_code=status.HTTP_201_CREATED)
def signed_upload(
    token: str,
    file: UploadFile,
    storage: StorageDep,
    signer: SignerDep,
    session: SessionDep,
    settings: SettingsDep,
) -> FileInfo:
    """Upload through a signed URL (multipart field ``file``)."""
    return service.signed_upload(
        storage,
        signer,
        token,
        filename=file.filename,
        stream=file.file,
        storage_limit_of=storage_limit_lookup(session, default_limits(settings)),
    )
