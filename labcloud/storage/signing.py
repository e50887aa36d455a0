"""Expiring, HMAC-signed URLs that move one file without a bearer token.

On local storage the APIs serve ``GET /_signed/{token}`` (download) and
``POST /_signed/{token}`` (upload, multipart field ``file``), the counterpart of an
S3 presigned URL: clients such as the upstream worker follow the URL blindly and
work against both. A token is::

    base64url(JSON {"k": storage key, "p": purpose, "e": expiry, unix seconds,
                    "a": audience, "n": nonce (uploads only),
                    "m": most bytes one upload may carry (uploads only, optional)})
    + "." + base64url(HMAC-SHA256 of the encoded payload)

Both APIs sign with the same key, so each token names the API that issued it (its
*audience*) and only that API redeems it: an upload URL is good for one upload,
and the API that hands it out is the one that remembers it was used (by its nonce,
``UsedUploadTokens`` in each API).

Issuing these URLs is local storage's part of ``Storage``'s transfer requests
(``labcloud.storage.transfers``); this module only signs and checks tokens.

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
import secrets
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


class Audience(StrEnum):
    """The API that issued a token and alone redeems it."""

    USER_API = "user"
    WORKER_API = "worker"


class SignedUrlInvalid(Forbidden):
    """The signed URL is not valid."""


class SignedUrlUsed(Forbidden):
    """This upload URL has already been used: ask for a new one."""


class SignedUrlOwnerInactive(Forbidden):
    """The account this signed URL belongs to is disabled."""


@dataclass(frozen=True, slots=True)
class SignedTransfer:
    """What a verified token allows."""

    key: str
    purpose: TransferPurpose
    expires_at: int
    # Unique per upload token: what "used once" is recorded by. None for downloads.
    nonce: str | None = None
    # The most bytes one upload through the token may carry; None: no cap.
    max_bytes: int | None = None

    @property
    def owner(self) -> str:
        """The subject whose files the key lies in (its first segment)."""
        return self.key.split("/", 1)[0]


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)


def _size(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"not a size: {value!r}")
    return value


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

    def token(
        self,
        *,
        key: str,
        purpose: TransferPurpose,
        expires_in: int,
        audience: Audience,
        max_bytes: int | None = None,
    ) -> str:
        """A token allowing ``purpose`` on ``key`` for ``expires_in`` seconds, to be
        redeemed at ``audience``; an upload through it may carry at most
        ``max_bytes`` (None: no cap)."""
        if expires_in <= 0:
            raise ValueError("expires_in must be a positive number of seconds")
        if max_bytes is not None and (purpose is TransferPurpose.DOWNLOAD or max_bytes < 0):
            raise ValueError("max_bytes is a non-negative size, for upload tokens only")
        body: dict[str, str | int] = {
            "k": check_key(key),
            "p": purpose.value,
            "e": int(self._clock()) + expires_in,
            "a": audience.value,
        }
        if purpose is not TransferPurpose.DOWNLOAD:
            body["n"] = secrets.token_urlsafe(12)
        if max_bytes is not None:
            body["m"] = max_bytes
        payload = _encode(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{_encode(self._signature(payload))}"

    def sign(
        self,
        *,
        key: str,
        purpose: TransferPurpose,
        base_url: str,
        expires_in: int,
        audience: Audience,
        method: str | None = None,
        max_bytes: int | None = None,
    ) -> SignedRequest:
        """The request that performs ``purpose`` on ``key`` without a bearer token:
        a GET for a download; a POST to which the client adds multipart ``file``
        for an upload (of at most ``max_bytes``, None: no cap). ``method``, when
        given, must be the purpose's method."""
        if method is not None and method.upper() != purpose.method:
            raise ValueError(f"a {purpose.value} URL is a {purpose.method} request, not {method}")
        token = self.token(
            key=key,
            purpose=purpose,
            expires_in=expires_in,
            audience=audience,
            max_bytes=max_bytes,
        )
        return SignedRequest(
            method=purpose.method,
            url=f"{base_url.rstrip('/')}{SIGNED_PATH}/{token}",
            headers={},
            data={},
        )

    def verify_transfer(
        self, token: str, purposes: Collection[TransferPurpose], *, audience: Audience
    ) -> SignedTransfer:
        """Check the token's signature, expiry, audience and purpose (one of
        ``purposes``)."""
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
                nonce=str(body["n"]) if "n" in body else None,
                max_bytes=_size(body["m"]) if "m" in body else None,
            )
            issued_for = Audience(body["a"])
            if transfer.purpose is not TransferPurpose.DOWNLOAD and not transfer.nonce:
                raise ValueError("an upload token without a nonce")
        except (KeyError, TypeError, ValueError, binascii.Error, UnsafePath):
            # Only a holder of the key can produce a valid signature, so this means
            # a token from an incompatible version rather than an attack.
            raise SignedUrlInvalid("signed URL signature invalid") from None
        if self._clock() >= transfer.expires_at:
            raise SignedUrlInvalid("signed URL expired")
        if issued_for is not audience:
            raise SignedUrlInvalid("signed URL was issued by another service")
        if transfer.purpose not in purposes:
            raise SignedUrlInvalid("signed URL is not for this operation")
        return transfer

    def verify(self, token: str, purpose: TransferPurpose, *, audience: Audience) -> str:
        """The storage key a valid token for ``purpose`` names; raises
        ``SignedUrlInvalid`` saying whether it expired, was tampered with, is for
        another operation or another service."""
        return self.verify_transfer(token, (purpose,), audience=audience).key
