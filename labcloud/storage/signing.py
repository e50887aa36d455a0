"""Expiring, HMAC-signed URLs that move one file without a bearer token.

On local storage the APIs serve ``GET /_signed/{token}`` (download) and
``POST /_signed/{token}`` (upload, multipart field ``file``), the counterpart of an
S3 presigned URL: clients such as the upstream worker follow the URL blindly and
work against both. A token is::

    base64url(JSON {"k": storage key, "p": purpose, "e": expiry, unix seconds})
    + "." + base64url(HMAC-SHA256 of the encoded payload)

Both parts use the URL-safe alphabet without padding, so a token needs no escaping
in a path. The signature is checked (in constant time) before anything in the
payload is believed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import StrEnum

from labcloud.contract import SignedRequest
from labcloud.errors import Forbidden
from labcloud.storage.paths import UnsafePath, check_key

SIGNED_PATH = "/_signed"


class TransferPurpose(StrEnum):
    """What a signed URL lets its holder do with its key."""

    # GET: the file, or a folder as a zip.
    DOWNLOAD = "download"
    # POST multipart ``file``: written to exactly the key.
    UPLOAD = "upload"
    # POST multipart ``file``: written into the folder key under the uploaded file's
    # name (the local twin of an S3 presigned POST for ``<prefix>/${filename}``).
    UPLOAD_INTO = "upload_into"

    @property
    def method(self) -> str:
        return "GET" if self is TransferPurpose.DOWNLOAD else "POST"


class SignedUrlInvalid(Forbidden):
    """The signed URL is not valid."""


@dataclass(frozen=True, slots=True)
class SignedTransfer:
    """What a verified token allows."""

    key: str
    purpose: TransferPurpose
    expires_at: int


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)


class UrlSigner:
    """Signs and verifies transfer tokens with one secret key (both APIs derive it
    from the internal key, see ``ServiceSettings.url_signing_key``)."""

    def __init__(self, key: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 16:
            raise ValueError("the URL signing key must be at least 16 bytes long")
        self._key = key
        self._clock = clock

    def _signature(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest()

    def token(self, *, key: str, purpose: TransferPurpose, expires_in: int) -> str:
        """A token allowing ``purpose`` on ``key`` for ``expires_in`` seconds."""
        if expires_in <= 0:
            raise ValueError("expires_in must be a positive number of seconds")
        body = {"k": check_key(key), "p": purpose.value, "e": int(self._clock()) + expires_in}
        payload = _encode(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{_encode(self._signature(payload))}"

    def sign(
        self,
        *,
        key: str,
        purpose: TransferPurpose,
        base_url: str,
        expires_in: int,
        method: str | None = None,
    ) -> SignedRequest:
        """The request that performs ``purpose`` on ``key`` without a bearer token:
        a GET for a download; a POST to which the client adds multipart ``file``
        for an upload. ``method``, when given, must be the purpose's method."""
        if method is not None and method.upper() != purpose.method:
            raise ValueError(f"a {purpose.value} URL is a {purpose.method} request, not {method}")
        token = self.token(key=key, purpose=purpose, expires_in=expires_in)
        return SignedRequest(
            method=purpose.method,
            url=f"{base_url.rstrip('/')}{SIGNED_PATH}/{token}",
            headers={},
            data={},
        )

    def verify_transfer(self, token: str, purposes: Collection[TransferPurpose]) -> SignedTransfer:
        """Check the token's signature, expiry and purpose (one of ``purposes``)."""
        payload, _, signature = token.partition(".")
        try:
            authentic = bool(payload) and hmac.compare_digest(
                _decode(signature), self._signature(payload)
            )
        except (ValueError, UnicodeError, binascii.Error):
            authentic = False
        if not authentic:
            raise SignedUrlInvalid("signed URL signature invalid")
        try:
            body = json.loads(_decode(payload))
            transfer = SignedTransfer(
                key=check_key(str(body["k"])),
                purpose=TransferPurpose(body["p"]),
                expires_at=int(body["e"]),
            )
        except (KeyError, TypeError, ValueError, binascii.Error, UnsafePath):
            # Only a holder of the key can produce a valid signature, so this means
            # a token from an incompatible version rather than an attack.
            raise SignedUrlInvalid("signed URL signature invalid") from None
        if self._clock() >= transfer.expires_at:
            raise SignedUrlInvalid("signed URL expired")
        if transfer.purpose not in purposes:
            raise SignedUrlInvalid("signed URL is not for this operation")
        return transfer

    def verify(self, token: str, purpose: TransferPurpose) -> str:
        """The storage key a valid token for ``purpose`` names; raises
        ``SignedUrlInvalid`` saying whether it expired, was tampered with or is for
        another operation."""
        return self.verify_transfer(token, (purpose,)).key
