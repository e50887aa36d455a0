"""Which files a worker may move, and the short-lived requests that move them.

A worker reaches only the inputs (``files_down`` values) and the output locations
(``paths_upload``) of the jobs it currently holds; anything else is "not found",
never "forbidden", so a worker cannot probe for other users' files.

Uploads follow DECODE's contract: ``base_path`` names a *folder* under the job's
``type`` location ("" for the location itself) and each multipart part's file name
names the stored file (``labcloud.storage.uploads``). Results count against their
owner's storage limit, which the user API reports with the account's state, with
the bytes the owner's files take as it counts them: an upload reserves its bytes
against that count and reports them once written (``worker_api.clients.accounts``),
so no check lists the owner's files, and an upload URL carries at most what is
left. (From a user API that does not count, the bytes are summed from storage, as
before.) The log gets a small allowance beyond the limit (``LOG_ALLOWANCE_BYTES``)
so that a job stopped by the limit can still say so in its log.

The requests that move files without the bearer token are the storage's transfer
requests: this module authorises them and asks the storage, which signs (local) or
presigns (S3) them. The ``/_signed/{token}`` routes that redeem local storage's URLs
are ``worker_api.files.signed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from sqlalchemy.orm import Session

from labcloud.contract import FileArea, OutputKind, PathsUpload, SignedRequest
from labcloud.db import utcnow
from labcloud.errors import NotFound
from labcloud.storage import Entry, Storage, check_key, child_key, normalise_path, split_user_key
from labcloud.storage.quota import StorageLimitReached, write_files_within_limit
from labcloud.storage.uploads import IncomingFile, check_file_target, folder_upload_keys
from worker_api.clients.accounts import AccountChecker
from worker_api.queue import repository
from worker_api.queue.service import JobNotFound

# How far a job's log may go beyond its owner's storage limit: the log of a job
# whose results hit the limit is what tells the owner so.
LOG_ALLOWANCE_BYTES = 16 * 1024 * 1024


class InputNotHeld(NotFound):
    """No job this worker holds has this input."""


@dataclass(frozen=True, slots=True)
class UploadTarget:
    """Where a worker's upload goes: the storage key of the folder, and the end of
    the cancel grace when it is the log of a job cancelled while the worker held it
    (None for a job it holds)."""

    folder_key: str
    grace_until: datetime | None = None


def upload_target(
    session: Session, queue_id: int, *, worker: str, kind: OutputKind, base_path: str
) -> UploadTarget:
    """The folder ``base_path`` under the job's ``kind`` location, where uploaded
    files go under their own names; the job must be held by ``worker``, and
    ``base_path`` must stay inside. Raises ``JobNotFound``.

    After a cancellation that keeps the job's outputs, its last worker may still
    upload the job's log for a short grace (``worker_api.queue.service.cancel``)."""
    job = repository.leased_to(session, queue_id, worker)
    grace_until: datetime | None = None
    if job is None and kind is OutputKind.LOG:
        job = repository.log_upload_allowed(session, queue_id, worker, now=utcnow())
        grace_until = job.log_upload_until if job is not None else None
    if job is None:
        raise JobNotFound(f"job {queue_id} not found or not held by worker {worker}")
    location = check_key(PathsUpload.model_validate(job.paths_upload).for_kind(kind))
    folder = normalise_path(base_path)
    return UploadTarget(child_key(location, folder) if folder else location, grace_until)


def owner_limit(accounts: AccountChecker, key: str) -> int | None:
    """The most bytes the owner of ``key`` may store (None: no limit), with the
    log's allowance for a key in the log area."""
    parts = split_user_key(key)
    limit = accounts.account(parts.subject).max_storage_bytes
    if limit is not None and parts.area is FileArea.LOG:
        return limit + LOG_ALLOWANCE_BYTES
    return limit


def owner_remaining(accounts: AccountChecker, key: str) -> int | None:
    """What the owner of ``key`` may still store there (None: no limit): the limit
    (with the log's allowance) less what their files take, when the user API counts
    them; the whole limit when it does not."""
    subject = split_user_key(key).subject
    limit = owner_limit(accounts, key)
    if limit is None or not accounts.account(subject).counted:
        return limit
    return accounts.remaining(subject, limit)


def upload_request(
    storage: Storage, accounts: AccountChecker, target: UploadTarget, *, expires_in: int
) -> SignedRequest:
    """The storage's request uploading files (multipart field ``file``, the part's
    file name names the file) into ``target``, good for one upload and at most what
    the owner may still store (checked again, against what the owner then stores,
    when the upload lands); ``StorageLimitReached`` when that is nothing. During a
    cancel grace the request expires with the grace."""
    if target.grace_until is not None:
        remaining = math.ceil((target.grace_until - utcnow()).total_seconds())
        expires_in = max(1, min(expires_in, remaining))
    cap = owner_remaining(accounts, target.folder_key)
    if cap == 0:
        subject = split_user_key(target.folder_key).subject
        raise StorageLimitReached(
            f"storage limit reached: the job's owner stores {accounts.used(subject):,} bytes "
            f"of the {owner_limit(accounts, target.folder_key):,} bytes allowed here; "
            "no more results can be uploaded"
        )
    return storage.upload_into_request(target.folder_key, expires_in=expires_in, max_bytes=cap)


def input_key(session: Session, uri: str, *, worker: str) -> str:
    """``uri`` as a storage key, if it is an input of a job ``worker`` holds.
    Raises ``InputNotHeld``."""
    for job in repository.jobs_leased_to(session, worker):
        if uri in job.spec.get("handler", {}).get("files_down", {}).values():
            return check_key(uri)
    raise InputNotHeld(f"{uri!r} is not an input of a job held by worker {worker}")


def download_request(
    session: Session, storage: Storage, uri: str, *, worker: str, expires_in: int
) -> SignedRequest:
    """The storage's request downloading the input ``uri`` of a job ``worker``
    holds."""
    return storage.download_request(input_key(session, uri, worker=worker), expires_in=expires_in)


def store_files(
    storage: Storage, accounts: AccountChecker, targets: Sequence[tuple[str, BinaryIO]]
) -> list[Entry]:
    """Write each ``(key, body)`` of one upload (all in one folder of one owner)
    within the owner's storage limit; every key and the limit are checked before
    anything is written: ``Conflict`` or ``StorageLimitReached``."""
    for key, _ in targets:
        check_file_target(storage, key)
    if not targets:
        return []
    first = targets[0][0]
    owner = split_user_key(first).subject
    # The user API's count when it keeps one; otherwise summed from storage.
    usage = accounts if accounts.account(owner).counted else None
    return write_files_within_limit(
        storage, owner, targets, owner_limit(accounts, first), usage=usage
    )


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
    return store_files(
        storage, accounts, [(key, part.stream) for key, part in zip(keys, parts, strict=True)]
    )
