"""Transfers without a bearer token, as local storage hands them out and takes them back.

``Storage`` answers "a request that downloads this key / uploads this file / uploads
into this folder" (``Storage.download_request``, ``upload_request``,
``upload_into_request``). S3 answers with presigned requests that S3 itself checks.
A local folder has no server of its own: the API that uses it serves
``/_signed/{token}``, and the requests are LabCloud's signed URLs
(``labcloud.storage.signing``) to that route. So a local storage is built with the
``LocalTransfers`` of the API process it serves (``make_storage(settings,
transfers=...)``): the signing key, the API's public base URL, and its audience, so
that only that API redeems the URL.

Redeeming the URLs is local storage's business too, and lives here: which tokens
each signed route takes, where the parts of an upload through one go, and the size
an upload token allows. What an API adds on redemption (the owner's account must be
active, an upload URL is used once, the owner's storage limit, the response) stays
in that API's files service.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

from labcloud.contract import SignedRequest
from labcloud.errors import PayloadTooLarge
from labcloud.storage.quota import stream_size
from labcloud.storage.signing import Audience, SignedTransfer, TransferPurpose, UrlSigner
from labcloud.storage.uploads import IncomingFile, UploadRefused, folder_upload_keys

_UPLOADS = (TransferPurpose.UPLOAD, TransferPurpose.UPLOAD_INTO)


class UploadTooLarge(PayloadTooLarge):
    """This upload is larger than its upload URL allows."""


class LocalTransfers:
    """Signs transfer requests for one API (its public base URL and audience) and
    checks the tokens that come back to that API's ``/_signed/{token}`` routes."""

    def __init__(self, signer: UrlSigner, *, base_url: str, audience: Audience) -> None:
        self._signer = signer
        self._base_url = base_url
        self._audience = audience

    @property
    def audience(self) -> Audience:
        """The API that issues these URLs and alone redeems them."""
        return self._audience

    def request(
        self,
        key: str,
        purpose: TransferPurpose,
        *,
        expires_in: int,
        max_bytes: int | None = None,
    ) -> SignedRequest:
        """The signed request for ``purpose`` on ``key``; ``max_bytes`` caps an
        upload (None: no cap) and means nothing for a download."""
        return self._signer.sign(
            key=key,
            purpose=purpose,
            base_url=self._base_url,
            expires_in=expires_in,
            audience=self._audience,
            max_bytes=None if purpose is TransferPurpose.DOWNLOAD else max_bytes,
        )

    def download(self, token: str) -> SignedTransfer:
        """The download a token allows. Raises ``SignedUrlInvalid`` (tampered with,
        expired, issued by the other API, or not a download)."""
        return self._signer.verify_transfer(
            token, (TransferPurpose.DOWNLOAD,), audience=self._audience
        )

    def upload(self, token: str) -> SignedTransfer:
        """The upload (of one file, or into a folder) a token allows. Raises
        ``SignedUrlInvalid`` like ``download``."""
        return self._signer.verify_transfer(token, _UPLOADS, audience=self._audience)


def _check_size(transfer: SignedTransfer, parts: Sequence[IncomingFile]) -> None:
    if transfer.max_bytes is None:
        return
    sizes = [stream_size(part.stream) for part in parts]
    if any(size is None for size in sizes):
        # Never the case for a multipart body, which the form parser spools.
        raise UploadRefused("the size of this upload cannot be told before storing it")
    total = sum(size for size in sizes if size is not None)
    if total > transfer.max_bytes:
        raise UploadTooLarge(
            f"this upload of {total:,} bytes is larger than the {transfer.max_bytes:,} bytes "
            "its upload URL allows"
        )


def upload_targets(
    transfer: SignedTransfer, parts: Sequence[IncomingFile]
) -> list[tuple[str, BinaryIO]]:
    """Where each part of an upload through ``transfer`` goes: into the folder under
    its own file name (``UPLOAD_INTO``, see ``labcloud.storage.uploads``), or, for
    the one part an ``UPLOAD`` takes, exactly at the signed key. Refuses the whole
    upload (``UploadRefused``, ``UploadTooLarge``) before anything is written."""
    if transfer.purpose is TransferPurpose.UPLOAD_INTO:
        keys = folder_upload_keys(transfer.key, [part.filename for part in parts])
    elif transfer.purpose is TransferPurpose.UPLOAD:
        if len(parts) != 1:
            raise UploadRefused(f"this upload URL stores one file: send one part, not {len(parts)}")
        keys = [transfer.key]
    else:
        raise ValueError(f"not an upload: {transfer.purpose.value}")
    _check_size(transfer, parts)
    return [(key, part.stream) for key, part in zip(keys, parts, strict=True)]
