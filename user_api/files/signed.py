"""What the user API's ``/_signed/{token}`` routes do, without HTTP: redeem the
signed URLs its local storage handed out (``labcloud.storage.transfers``).

Only local storage signs such URLs; S3 checks its own presigned requests and these
routes answer 404 there. The signature is the credential, so no bearer token is
read, but the URL works only while its owner's account is active, and an upload
URL only once (``labcloud.storage.redeem``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import PurePosixPath

from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import unit_of_work, utcnow
from labcloud.errors import LabCloudError, NotFound
from labcloud.storage.local import LocalStorage
from labcloud.storage.paths import split_user_key
from labcloud.storage.quota import write_files_within_limit
from labcloud.storage.redeem import claim_upload, release_upload
from labcloud.storage.signing import SignedTransfer, SignedUrlOwnerInactive
from labcloud.storage.transfers import upload_targets
from labcloud.storage.uploads import IncomingFile
from user_api.files.schemas import UploadedFiles
from user_api.files.service import (
    ROOT_ARCHIVE_NAME,
    DownloadTarget,
    JobNamed,
    check_upload_targets,
    uploaded_files,
)
from user_api.limits import OwnerState
from user_api.models import USED_UPLOAD_TOKENS


def _check_owner(owner_of: Callable[[str], OwnerState], key: str) -> OwnerState:
    state = owner_of(key.split("/", 1)[0])
    if not state.active:
        raise SignedUrlOwnerInactive(
            "the account this link belongs to is disabled: the link no longer works"
        )
    return state


def signed_download_target(
    storage: LocalStorage, token: str, *, owner_of: Callable[[str], OwnerState]
) -> DownloadTarget:
    """What a signed download URL of ``storage`` names, if it is valid, its owner
    (``owner_of`` the key's subject) still active and the thing still there.
    Raises ``SignedUrlInvalid``, ``SignedUrlOwnerInactive`` or ``NotFound``."""
    key = storage.transfers.download(token).key
    _check_owner(owner_of, key)
    if storage.stat(key) is None:
        raise NotFound("the file or folder of this link no longer exists")
    name = PurePosixPath(key).name if "/" in key else ROOT_ARCHIVE_NAME
    return DownloadTarget(key, name)


def check_signed_upload(
    storage: LocalStorage, token: str, *, owner_of: Callable[[str], OwnerState]
) -> SignedTransfer:
    """The upload a signed URL of ``storage`` allows, checked before its body is
    read: valid, and its owner still active (``signed_upload`` checks again, and
    that it was not used). Raises ``SignedUrlInvalid`` or
    ``SignedUrlOwnerInactive``."""
    transfer = storage.transfers.upload(token)
    _check_owner(owner_of, transfer.key)
    return transfer


def signed_upload(
    storage: LocalStorage,
    token: str,
    parts: Sequence[IncomingFile],
    *,
    owner_of: Callable[[str], OwnerState],
    session_factory: sessionmaker[Session],
    job_named: JobNamed,
) -> UploadedFiles:
    """Store an upload sent to a signed URL of ``storage``: inside the signed
    folder, each part under its file name (or the one file at the signed key; see
    ``labcloud.storage.transfers``), within the size the URL allows and the owner's
    storage limit; the URL is then used up (recorded in short transactions of their
    own, so no transaction stays open while files are written). A refused upload (a
    bad name, too large, over the limit) leaves the URL usable. Raises
    ``SignedUrlInvalid``, ``SignedUrlUsed``, ``SignedUrlOwnerInactive``,
    ``UploadTooLarge`` or ``StorageLimitReached``."""
    transfer = storage.transfers.upload(token)
    # Only keys in a user's areas can be reported back as file info.
    subject = split_user_key(transfer.key).subject
    state = _check_owner(owner_of, transfer.key)
    with unit_of_work(session_factory) as session:
        claim_upload(session, USED_UPLOAD_TOKENS, transfer, utcnow())
    try:
        targets = check_upload_targets(storage, upload_targets(transfer, parts), job_named)
        entries = write_files_within_limit(storage, subject, targets, state.max_storage_bytes)
    except LabCloudError:
        with unit_of_work(session_factory) as session:
            release_upload(session, USED_UPLOAD_TOKENS, transfer)
        raise
    return uploaded_files(transfer.key, entries)
