"""Which files a worker may move, and the short-lived requests that move them.

A worker reaches only the inputs (``files_down`` values) and the output locations
(``paths_upload``) of the jobs it currently holds; anything else is "not found",
never "forbidden", so a worker cannot probe for other users' files.

Uploads follow DECODE's contract: ``base_path`` names a *folder* under the job's
``type`` location ("" for the location itself) and each multipart part's file name
names the stored file (``labcloud.storage.uploads``). Results count against their
owner's storage limit, which the user API reports with the account's state; the
log gets a small allowance beyond it (``LOG_ALLOWANCE_BYTES``) so that a job
stopped by the limit can still say so in its log.

Signed URLs are redeemed only while their owner's account is active, and an upload
URL only once (``labcloud.storage.redeem``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import FileArea, OutputKind, PathsUpload, SignedRequest
from labcloud.db import unit_of_work, utcnow
from labcloud.errors import LabCloudError, NotFound
from labcloud.storage import (
    Audience,
    Entry,
    SignedUrlOwnerInactive,
    Storage,
    TransferPurpose,
    UrlSigner,
    check_key,
    child_key,
    normalise_path,
    split_user_key,
)
from labcloud.storage.quota import write_files_within_limit
from labcloud.storage.redeem import claim_upload, release_upload
from labcloud.storage.uploads import check_file_target, folder_upload_keys
from worker_api.clients.accounts import AccountChecker
from worker_api.models import USED_UPLOAD_TOKENS
from worker_api.queue.repository import QueueRepository
from worker_api.queue.service import JobNotFound

# How far a job's log may go beyond its owner's storage limit: the log of a job
# whose results hit the limit is what tells the owner so.
LOG_ALLOWANCE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IncomingFile:
    """One multipart part of an upload: its file name and its (spooled) body."""

    filename: str | None
    stream: BinaryIO


class InputNotHeld(NotFound):
    """No job this worker holds has this input."""


class FileService:
    """Authorises a worker's transfers and signs them."""

    def __init__(
        self, session: Session, signer: UrlSigner, *, public_url: str, expires_in: int
    ) -> None:
        self._repository = QueueRepository(session)
        self._signer = signer
        self._public_url = public_url
        self._expires_in = expires_in

    def _upload_target(
        self, queue_id: int, *, worker: str, kind: OutputKind, base_path: str
    ) -> tuple[str, datetime | None]:
        """The storage key of the folder, and the end of the cancel grace when the
        upload is the log of a job cancelled while ``worker`` held it (``None`` for
        a held job)."""
        job = self._repository.leased_to(queue_id, worker)
        deadline: datetime | None = None
        if job is None and kind is OutputKind.LOG:
            job = self._repository.log_upload_allowed(queue_id, worker, now=utcnow())
            deadline = job.log_upload_until if job is not None else None
        if job is None:
            raise JobNotFound(f"job {queue_id} not found or not held by worker {worker}")
        location = check_key(PathsUpload.model_validate(job.paths_upload).for_kind(kind))
        folder = normalise_path(base_path)
        return (child_key(location, folder) if folder else location), deadline

    def upload_folder(self, queue_id: int, *, worker: str, kind: OutputKind, base_path: str) -> str:
        """The storage key of the folder ``base_path`` under the job's ``kind``
        location, where uploaded files go under their own names; the job must be
        held by ``worker``, and ``base_path`` must stay inside.

        After a cancellation that keeps the job's outputs, its last worker may still
        upload the job's log for a short grace (``QueueService.cancel``)."""
        key, _ = self._upload_target(queue_id, worker=worker, kind=kind, base_path=base_path)
        return key

    def upload_request(
        self, queue_id: int, *, worker: str, kind: OutputKind, base_path: str
    ) -> SignedRequest:
        """A request uploading files (multipart field ``file``, the part's file name
        names the file) into the folder ``base_path``; good for one upload. During a
        cancel grace the request expires with the grace."""
        key, deadline = self._upload_target(queue_id, worker=worker, kind=kind, base_path=base_path)
        expires_in = self._expires_in
        if deadline is not None:
            remaining = math.ceil((deadline - utcnow()).total_seconds())
            expires_in = max(1, min(expires_in, remaining))
        return self._sign(key, TransferPurpose.UPLOAD_INTO, expires_in=expires_in)

    def input_key(self, uri: str, *, worker: str) -> str:
        """``uri`` as a storage key, if it is an input of a job ``worker`` holds."""
        for job in self._repository.jobs_leased_to(worker):
            if uri in job.spec.get("handler", {}).get("files_down", {}).values():
                return check_key(uri)
        raise InputNotHeld(f"{uri!r} is not an input of a job held by worker {worker}")

    def download_request(self, uri: str, *, worker: str) -> SignedRequest:
        """A request downloading the input ``uri``."""
        return self._sign(self.input_key(uri, worker=worker), TransferPurpose.DOWNLOAD)

    def _sign(
        self, key: str, purpose: TransferPurpose, *, expires_in: int | None = None
    ) -> SignedRequest:
        return self._signer.sign(
            key=key,
            purpose=purpose,
            base_url=self._public_url,
            expires_in=expires_in if expires_in is not None else self._expires_in,
            audience=Audience.WORKER_API,
        )


def _limit_for(folder_key: str, limit: int | None) -> int | None:
    if limit is not None and split_user_key(folder_key).area is FileArea.LOG:
        return limit + LOG_ALLOWANCE_BYTES
    return limit


def store_results(
    storage: Storage,
    accounts: AccountChecker,
    folder_key: str,
    parts: Sequence[IncomingFile],
) -> list[Entry]:
    """Store each part in the folder ``folder_key`` under its file name, within the
    owner's storage limit. Every name is checked, and the limit too, before
    anything is written: ``BadRequest``, ``Conflict`` or ``StorageLimitReached``."""
    keys = folder_upload_keys(folder_key, [part.filename for part in parts])
    for key in keys:
        check_file_target(storage, key)
    owner = split_user_key(folder_key).subject
    limit = _limit_for(folder_key, accounts.account(owner).max_storage_bytes)
    files = [(key, part.stream) for key, part in zip(keys, parts, strict=True)]
    return write_files_within_limit(storage, owner, files, limit)


class SignedTransfers:
    """Redeems the signed URLs this API handed out (no bearer token: the signature
    is the credential), while their owner's account is active."""

    def __init__(
        self,
        signer: UrlSigner,
        storage: Storage,
        accounts: AccountChecker,
        session_factory: sessionmaker[Session],
    ) -> None:
        self._signer = signer
        self._storage = storage
        self._accounts = accounts
        self._session_factory = session_factory

    def _check_owner(self, key: str) -> None:
        if not self._accounts.is_active(key.split("/", 1)[0]):
            raise SignedUrlOwnerInactive(
                "the account this link belongs to is disabled: the link no longer works"
            )

    def download_key(self, token: str) -> str:
        """The key a download URL names. Raises ``SignedUrlInvalid`` or
        ``SignedUrlOwnerInactive``."""
        key = self._signer.verify(token, TransferPurpose.DOWNLOAD, audience=Audience.WORKER_API)
        self._check_owner(key)
        return key

    def check_upload(self, token: str) -> str:
        """Refuse an invalid upload URL before its body is read; returns the key of
        the folder it uploads into."""
        transfer = self._signer.verify_transfer(
            token, (TransferPurpose.UPLOAD_INTO,), audience=Audience.WORKER_API
        )
        self._check_owner(transfer.key)
        return transfer.key

    def upload(self, token: str, parts: Sequence[IncomingFile]) -> list[Entry]:
        """Store an upload sent to an upload URL, which is then used up. A refused
        upload (a bad name, over the limit) leaves the URL usable, so the worker
        may retry it. Raises ``SignedUrlUsed`` for a URL already used."""
        transfer = self._signer.verify_transfer(
            token, (TransferPurpose.UPLOAD_INTO,), audience=Audience.WORKER_API
        )
        self._check_owner(transfer.key)
        with unit_of_work(self._session_factory) as session:
            claim_upload(session, USED_UPLOAD_TOKENS, transfer, utcnow())
        try:
            return store_results(self._storage, self._accounts, transfer.key, parts)
        except LabCloudError:
            with unit_of_work(self._session_factory) as session:
                release_upload(session, USED_UPLOAD_TOKENS, transfer)
            raise
