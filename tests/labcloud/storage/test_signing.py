"""Signed transfer URLs: round trip, expiry, tampering, purpose."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable

import pytest

from labcloud.errors import Forbidden
from labcloud.storage.paths import UnsafePath
from labcloud.storage.signing import SignedUrlInvalid, TransferPurpose, UrlSigner

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
        key="u1/data/run 1/ä.tif", purpose=TransferPurpose.DOWNLOAD, base_url=BASE, expires_in=60
    )
    assert request.model_dump() == {
        "method": "GET",
        "url": request.url,
        "headers": {},
        "data": {},
    }
    token = token_of(request.url)
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)
    assert signer.verify(token, TransferPurpose.DOWNLOAD) == "u1/data/run 1/ä.tif"


def test_upload_is_a_post_with_empty_data() -> None:
    signer = UrlSigner(KEY, clock=Clock())
    request = signer.sign(
        method="POST",
        key="u1/output/job/x",
        purpose=TransferPurpose.UPLOAD,
        base_url=BASE,
        expires_in=60,
    )
    assert (request.method, request.headers, request.data) == ("POST", {}, {})
    assert signer.verify(token_of(request.url), TransferPurpose.UPLOAD) == "u1/output/job/x"


def test_method_must_match_purpose() -> None:
    signer = UrlSigner(KEY)
    with pytest.raises(ValueError, match="a download URL is a GET request"):
        signer.sign(
            method="POST",
            key="u1/data/x",
            purpose=TransferPurpose.DOWNLOAD,
            base_url=BASE,
            expires_in=60,
        )


def test_expiry() -> None:
    clock = Clock()
    signer = UrlSigner(KEY, clock=clock)
    token = signer.token(key="u1/data/x", purpose=TransferPurpose.DOWNLOAD, expires_in=30)
    clock.now += 29.5
    assert signer.verify(token, TransferPurpose.DOWNLOAD) == "u1/data/x"
    clock.now += 0.5
    with pytest.raises(SignedUrlInvalid) as caught:
        signer.verify(token, TransferPurpose.DOWNLOAD)
    assert caught.value.message == "signed URL expired"
    assert caught.value.status_code == 403
    assert isinstance(caught.value, Forbidden)


def test_wrong_purpose() -> None:
    signer = UrlSigner(KEY)
    token = signer.token(key="u1/data/x", purpose=TransferPurpose.DOWNLOAD, expires_in=30)
    for purpose in (TransferPurpose.UPLOAD, TransferPurpose.UPLOAD_INTO):
        with pytest.raises(SignedUrlInvalid, match=r"^signed URL is not for this operation$"):
            signer.verify(token, purpose)
    transfer = signer.verify_transfer(token, set(TransferPurpose))
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
    token = signer.token(key="u1/data/x", purpose=TransferPurpose.DOWNLOAD, expires_in=30)
    with pytest.raises(SignedUrlInvalid, match=r"^signed URL signature invalid$"):
        signer.verify(tamper(token), TransferPurpose.DOWNLOAD)


def test_another_key_does_not_verify() -> None:
    token = UrlSigner(KEY).token(key="u1/data/x", purpose=TransferPurpose.DOWNLOAD, expires_in=30)
    with pytest.raises(SignedUrlInvalid, match="signature invalid"):
        UrlSigner(b"z" * 32).verify(token, TransferPurpose.DOWNLOAD)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        UrlSigner(b"short")
    signer = UrlSigner(KEY)
    with pytest.raises(ValueError, match="positive"):
        signer.token(key="u1/data/x", purpose=TransferPurpose.DOWNLOAD, expires_in=0)
    with pytest.raises(UnsafePath):
        signer.token(key="../x", purpose=TransferPurpose.DOWNLOAD, expires_in=5)
