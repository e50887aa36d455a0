"""Signed transfer URLs: round trip, expiry, tampering, purpose."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable

import pytest

from labcloud.errors import Forbidden
from labcloud.storage.paths import UnsafePath
from labcloud.storage.signing import Audience, SignedUrlInvalid, TransferPurpose, UrlSigner

AUD = Audience.USER_API

KEY = b"k" * 32
BASE = "http://api.example.org:8000/"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def token_of(url: str) -> str:
    prefix = "http://api.example.org:8000/_signed/"
    assert url.startswith(prefix)
    return url.removeprefix(prefix)


def test_download_round_trip() -> None:
    signer = UrlSigner(KEY, clock=Clock())
    request = signer.sign(
        key="u1/data/run 1/ä.tif",
        purpose=TransferPurpose.DOWNLOAD,
        base_url=BASE,
        expires_in=60,
        audience=AUD,
    )
    assert request.model_dump() == {
        "method": "GET",
        "url": request.url,
        "headers": {},
        "data": {},
    }
    token = token_of(request.url)
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)
    assert signer.verify(token, TransferPurpose.DOWNLOAD, audience=AUD) == "u1/data/run 1/ä.tif"


def test_upload_is_a_post_with_empty_data() -> None:
    signer = UrlSigner(KEY, clock=Clock())
    request = signer.sign(
        method="POST",
        key="u1/output/job/x",
        purpose=TransferPurpose.UPLOAD,
        base_url=BASE,
        expires_in=60,
        audience=AUD,
    )
    assert (request.method, request.headers, request.data) == ("POST", {}, {})
    assert (
        signer.verify(token_of(request.url), TransferPurpose.UPLOAD, audience=AUD)
        == "u1/output/job/x"
    )


def test_method_must_match_purpose() -> None:
    signer = UrlSigner(KEY)
    with pytest.raises(ValueError, match="a download URL is a GET request"):
        signer.sign(
            method="POST",
            key="u1/data/x",
            purpose=TransferPurpose.DOWNLOAD,
            base_url=BASE,
            expires_in=60,
            audience=AUD,
        )


def test_expiry() -> None:
    clock = Clock()
    signer = UrlSigner(KEY, clock=clock)
    token = signer.token(
        key="u1/data/x", purpose=TransferPurpose.DOWNLOAD, expires_in=30, audience=AUD
    )
    clock.now += 29.5
    assert signer.verify(token, TransferPurpose.DOWNLOAD, audience=AUD) == "u1/data/x"
    clock.now += 0.5
    with pytest.raises(SignedUrlInvalid) as caught:
        signer.verify(token, TransferPurpose.DOWNLOAD, audience=AUD)
    assert caught.value.message == "signed URL expired"
    assert caught.value.status_code == 403
    assert isinstance(caught.value, Forbidden)


def test_wrong_purpose() -> None:
    signer = UrlSigner(KEY)
    token = signer.token(
        key="u1/data/x", purpose=TransferPurpose.DOWNLOAD, expires_in=30, audience=AUD
    )
    for purpose in (TransferPurpose.UPLOAD, TransferPurpose.UPLOAD_INTO):
        with pytest.raises(SignedUrlInvalid, match=r"^signed URL is not for this operation$"):
            signer.verify(token, purpose, audience=AUD)
    transfer = signer.verify_transfer(token, set(TransferPurpose), audience=AUD)
    assert (transfer.key, transfer.purpose) == ("u1/data/x", TransferPurpose.DOWNLOAD)


def _forge(token: str, **changes: object) -> str:
    payload, _, signature = token.partition(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    return f"{forged}.{signature}"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: _forge(t, k="u2/data/x"),
        lambda t: _forge(t, e=4_000_000_000),
        lambda t: _forge(t, p="upload"),
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),
        lambda t: t.partition(".")[0],
        lambda t: "." + t.partition(".")[2],
        lambda t: t + "x",
        lambda t: t.replace(".", ".é"),
        lambda t: "",
        lambda t: "not-a-token",
        lambda t: "a.b.c",
    ],
)
def test_tampering_is_detected(tamper: Callable[[str], str]) -> None:
    signer = UrlSigner(KEY)
    token = signer.token(
        key="u1/data/x", purpose=TransferPurpose.DOWNLOAD, expires_in=30, audience=AUD
    )
    with pytest.raises(SignedUrlInvalid, match=r"^signed URL signature invalid$"):
        signer.verify(tamper(token), TransferPurpose.DOWNLOAD, audience=AUD)


def test_another_key_does_not_verify() -> None:
    token = UrlSigner(KEY).token(
        key="u1/data/x", purpose=TransferPurpose.DOWNLOAD, expires_in=30, audience=AUD
    )
    with pytest.raises(SignedUrlInvalid, match="signature invalid"):
        UrlSigner(b"z" * 32).verify(token, TransferPurpose.DOWNLOAD, audience=AUD)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        UrlSigner(b"short")
    signer = UrlSigner(KEY)
    with pytest.raises(ValueError, match="positive"):
        signer.token(key="u1/data/x", purpose=TransferPurpose.DOWNLOAD, expires_in=0, audience=AUD)
    with pytest.raises(UnsafePath):
        signer.token(key="../x", purpose=TransferPurpose.DOWNLOAD, expires_in=5, audience=AUD)


def test_a_token_is_redeemed_only_by_the_service_that_issued_it() -> None:
    signer = UrlSigner(KEY)
    token = signer.token(
        key="u1/data", purpose=TransferPurpose.UPLOAD_INTO, expires_in=30, audience=AUD
    )
    assert signer.verify(token, TransferPurpose.UPLOAD_INTO, audience=AUD) == "u1/data"
    with pytest.raises(SignedUrlInvalid, match="issued by another service"):
        signer.verify(token, TransferPurpose.UPLOAD_INTO, audience=Audience.WORKER_API)
    # Tokens without an audience (an older version's) are not believed.
    with pytest.raises(SignedUrlInvalid, match="signature invalid"):
        signer.verify(_resign(token, a=None), TransferPurpose.UPLOAD_INTO, audience=AUD)


def test_upload_tokens_carry_a_nonce_and_downloads_none() -> None:
    signer = UrlSigner(KEY)

    def transfer(purpose: TransferPurpose) -> str | None:
        token = signer.token(key="u1/data/x", purpose=purpose, expires_in=30, audience=AUD)
        return signer.verify_transfer(token, (purpose,), audience=AUD).nonce

    nonces = {transfer(TransferPurpose.UPLOAD_INTO) for _ in range(50)}
    assert len(nonces) == 50 and None not in nonces
    assert transfer(TransferPurpose.DOWNLOAD) is None
    token = signer.token(
        key="u1/data", purpose=TransferPurpose.UPLOAD_INTO, expires_in=30, audience=AUD
    )
    with pytest.raises(SignedUrlInvalid, match="signature invalid"):
        signer.verify(_resign(token, n=None), TransferPurpose.UPLOAD_INTO, audience=AUD)


def test_upload_tokens_may_carry_a_size_cap() -> None:
    signer = UrlSigner(KEY)
    capped = signer.token(
        key="u1/data", purpose=TransferPurpose.UPLOAD_INTO, expires_in=30, audience=AUD, max_bytes=5
    )
    transfer = signer.verify_transfer(capped, (TransferPurpose.UPLOAD_INTO,), audience=AUD)
    assert transfer.max_bytes == 5
    free = signer.token(key="u1/data", purpose=TransferPurpose.UPLOAD, expires_in=30, audience=AUD)
    assert signer.verify_transfer(free, (TransferPurpose.UPLOAD,), audience=AUD).max_bytes is None
    # Raising the cap breaks the signature; a cap that is no size is not believed.
    with pytest.raises(SignedUrlInvalid, match="signature invalid"):
        signer.verify(_forge(capped, m=10**12), TransferPurpose.UPLOAD_INTO, audience=AUD)
    for bad in (-1, "5", True, 1.5):
        with pytest.raises(SignedUrlInvalid, match="signature invalid"):
            signer.verify(_resign(capped, m=bad), TransferPurpose.UPLOAD_INTO, audience=AUD)
    with pytest.raises(ValueError, match="upload tokens only"):
        signer.token(
            key="u1/x", purpose=TransferPurpose.DOWNLOAD, expires_in=30, audience=AUD, max_bytes=1
        )


def _resign(token: str, **changes: object) -> str:
    """The token with ``changes`` to its payload (None removes a field), signed
    again with the right key: what an older version would have issued."""
    import hashlib
    import hmac

    payload = token.partition(".")[0]
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for name, value in changes.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    encoded = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    signature = hmac.new(KEY, encoded.encode(), hashlib.sha256).digest()
    return f"{encoded}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
