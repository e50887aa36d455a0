"""What the worker API's ``/_signed/{token}`` routes do, without HTTP: redeem the
signed URLs its local storage handed out (``labcloud.storage.transfers``).

Only local storage signs such URLs; S3 checks its own presigned requests and these
routes answer 404 there. The signature is the credential, so no bearer token is
read, but the URL works only while its owner's account is active, and an upload
URL only once (``labcloud.storage.redeem``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import unit_of_work, utcnow
from labcloud.errors import LabCloudError
from labcloud.storage import Entry, LocalStorage, SignedUrlOwnerInactive, TransferPurpose
from labcloud.storage.redeem import claim_upload, release_upload
from labcloud.storage.signing import SignedTransfer
from labcloud.storage.transfers import upload_targets
from labcloud.storage.uploads import IncomingFile
from worker_api.clients.accounts import AccountChecker
from worker_api.files.service import store_files
from worker_api.models import USED_UPLOAD_TOKENS


def _check_owner(accounts: AccountChecker, key: str) -> None:
    if not accounts.is_active(key.split("/", 1)[0]):
        raise SignedUrlOwnerInactive(
            "the account this link belongs to is disabled: the link no longer works"
        )


def download_key(storage: LocalStorage, accounts: AccountChecker, token: str) -> str:
    """The key a download URL names. Raises ``SignedUrlInvalid`` or
    ``SignedUrlOwnerInactive``."""
    key = storage.transfers.download(token).key
    _check_owner(accounts, key)
    return key


def check_upload(storage: LocalStorage, accounts: AccountChecker, token: str) -> SignedTransfer:
    """Refuse an invalid upload URL before its body is read; returns the upload it
    allows (``upload`` checks again, and that it was not used)."""
    transfer = storage.transfers.upload(token)
    _check_owner(accounts, transfer.key)
    return transfer


def upload_folder(transfer: SignedTransfer) -> str:
    """The key of the folder an upload goes into (for an upload of one file, that
    file's folder)."""
    if transfer.purpose is TransferPurpose.UPLOAD:
        return PurePosixPath(transfer.key).parent.as_posix()
    return transfer.key


def upload(
    storage: LocalStorage,
    accounts: AccountChecker,
    session_factory: sessionmaker[Session],
    token: str,
    parts: Sequence[IncomingFile],
) -> list[Entry]:
    """Store an upload sent to an upload URL (into its folder under the parts' file
    names, or the one file at its key), within the size the URL allows and the
    owner's storage limit; the URL is then used up. A refused upload (a bad name,
    too large, over the limit) leaves the URL usable, so the worker may retry it.
    Raises ``SignedUrlUsed`` for a URL already used."""
    transfer = storage.transfers.upload(token)
    _check_owner(accounts, transfer.key)
    with unit_of_work(session_factory) as session:
        claim_upload(session, USED_UPLOAD_TOKENS, transfer, utcnow())
    try:
        return store_files(storage, accounts, upload_targets(transfer, parts))
    except LabCloudError:
        with unit_of_work(session_factory) as session:
            release_upload(session, USED_UPLOAD_TOKENS, transfer)
        raise
