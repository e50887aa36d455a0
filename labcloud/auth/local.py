"""Local auth: the user API signs ID tokens with an Ed25519 key and publishes the
public half as a JWKS, which the worker API fetches to verify workers' tokens. The
worker API thus never holds a key that could mint tokens."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm

from labcloud.auth.jwt import JwtVerifier, jwks_key_resolver

LOCAL_ISSUER = "labcloud"
LOCAL_AUDIENCE = "labcloud"
LOCAL_ALGORITHMS = ["EdDSA"]
GROUPS_CLAIM = "groups"


def generate_private_key_pem() -> str:
    key = Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


class LocalTokenIssuer:
    """Issues and verifies the user API's own ID tokens."""

    def __init__(self, private_key_pem: str, *, lifetime_seconds: int) -> None:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("LOCAL_AUTH_PRIVATE_KEY must be an Ed25519 private key (PEM)")
        self._private_key = key
        self._public_key: Ed25519PublicKey = key.public_key()
        raw = self._public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]
        self.lifetime_seconds = lifetime_seconds
        self._verifier = JwtVerifier(
            key_resolver=lambda _token: self._public_key,
            issuer=LOCAL_ISSUER,
            audience=LOCAL_AUDIENCE,
            algorithms=LOCAL_ALGORITHMS,
            groups_claim=GROUPS_CLAIM,
            name_claims=("email",),
        )

    def issue(self, *, subject: str, email: str, groups: list[str]) -> str:
        now = int(time.time())
        claims = {
            "iss": LOCAL_ISSUER,
            "aud": LOCAL_AUDIENCE,
            "sub": subject,
            "email": email,
            GROUPS_CLAIM: sorted(groups),
            "token_use": "id",
            "iat": now,
            "exp": now + self.lifetime_seconds,
            "jti": secrets.token_hex(8),
        }
        return jwt.encode(
            claims, self._private_key, algorithm="EdDSA", headers={"kid": self.key_id}
        )

    @property
    def verifier(self) -> JwtVerifier:
        return self._verifier

    def jwks(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(OKPAlgorithm.to_jwk(self._public_key))
        jwk.update({"kid": self.key_id, "use": "sig", "alg": "EdDSA"})
        return {"keys": [jwk]}


def local_jwks_verifier(jwks_url: str) -> JwtVerifier:
    """How the worker API verifies tokens issued by the user API's local auth."""
    return JwtVerifier(
        key_resolver=jwks_key_resolver(jwks_url),
        issuer=LOCAL_ISSUER,
        audience=LOCAL_AUDIENCE,
        algorithms=LOCAL_ALGORITHMS,
        groups_claim=GROUPS_CLAIM,
        name_claims=("email",),
    )


def cognito_verifier(*, jwks_url: str, issuer: str, client_id: str) -> JwtVerifier:
    """Cognito ID tokens: RS256, audience = app client id, groups in ``cognito:groups``."""
    return JwtVerifier(
        key_resolver=jwks_key_resolver(jwks_url),
        issuer=issuer,
        audience=client_id,
        algorithms=["RS256"],
        groups_claim="cognito:groups",
        name_claims=("email", "cognito:username"),
    )
