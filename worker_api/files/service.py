"""Which files a worker may move, and the short-lived requests that move them.

A worker reaches only the inputs (``files_down`` values) and the output locations
(``paths_upload``) of the jobs it currently holds; anything else is "not found",
never "forbidden", so a worker cannot probe for other users' files.
"""

from __future__ import annotations

import math
from datetime import datetime

from sqlalchemy.orm import Session

from labcloud.contract import OutputKind, PathsUpload, SignedRequest
from labcloud.db import utcnow
from labcloud.errors import NotFound
from labcloud.storage import TransferPurpose, UrlSigner, check_key, child_key
from worker_api.queue.repository import QueueRepository
from worker_api.queue.service import JobNotFound


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
        """The storage key, and the end of the cancel grace when the upload is the
        log of a job cancelled while ``worker`` held it (``None`` for a held job)."""
        job = self._repository.leased_to(queue_id, worker)
        deadline: datetime | None = None
        if job is None and kind is OutputKind.LOG:
            job = self._repository.log_upload_allowed(queue_id, worker, now=utcnow())
            deadline = job.log_upload_until if job is not None else None
        if job is None:
            raise JobNotFound(f"job {queue_id} not found or not held by worker {worker}")
        folder = PathsUpload.model_validate(job.paths_upload).for_kind(kind)
        return child_key(folder, base_path), deadline

    def upload_key(self, queue_id: int, *, worker: str, kind: OutputKind, base_path: str) -> str:
        """The storage key where ``base_path`` of the job's ``kind`` results goes;
        the job must be held by ``worker``, and ``base_path`` must stay inside.

        After a cancellation that keeps the job's outputs, its last worker may still
        upload the job's log for a short grace (``QueueService.cancel``)."""
        key, _ = self._upload_target(queue_id, worker=worker, kind=kind, base_path=base_path)
        return key

    def upload_request(
        self, queue_id: int, *, worker: str, kind: OutputKind, base_path: str
    ) -> SignedRequest:
        """A request uploading one file (multipart field ``file``) to ``base_path``.
        During a cancel grace the request expires with the grace."""
        key, deadline = self._upload_target(queue_id, worker=worker, kind=kind, base_path=base_path)
        expires_in = self._expires_in
        if deadline is not None:
            remaining = math.ceil((deadline - utcnow()).total_seconds())
            expires_in = max(1, min(expires_in, remaining))
        return self._sign(key, TransferPurpose.UPLOAD, expires_in=expires_in)

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
        )
