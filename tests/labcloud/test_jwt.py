"""Token verification remembers tokens it checked, never longer than they are valid."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from labcloud.auth import Principal
from labcloud.auth.jwt import JwtVerifier, VerifiedTokens
from labcloud.auth.local import (
    GROUPS_CLAIM,
    LOCAL_ALGORITHMS,
    LOCAL_AUDIENCE,
    LOCAL_ISSUER,
    LocalTokenIssuer,
    generate_private_key_pem,
)
from labcloud.auth.principal import InvalidToken

ADA = Principal(subject="s-ada", name="ada@example.org", groups=frozenset({"users"}))


def test_a_verified_token_is_remembered_until_it_expires() -> None:
    tokens = VerifiedTokens()
    tokens.put("valid", ADA, time.time() + 60)
    tokens.put("expired", ADA, time.time() - 1)
    assert tokens.get("valid") == ADA
    assert tokens.get("expired") is None
    assert tokens.get("never seen") is None


def test_remembered_at_most_max_age_and_size() -> None:
    tokens = VerifiedTokens(size=2, max_age=0.05)
    tokens.put("a", ADA, time.time() + 3600)
    tokens.put("b", ADA, time.time() + 3600)
    assert tokens.get("a") == ADA  # now the most recently used
    tokens.put("c", ADA, time.time() + 3600)
    assert tokens.get("b") is None  # the least recently used was dropped
    assert tokens.get("a") == ADA and tokens.get("c") == ADA
    time.sleep(0.06)
    assert tokens.get("a") is None  # older than max_age, though the token is still valid


def test_the_verifier_checks_each_token_once_and_any_change_again() -> None:
    issuer = LocalTokenIssuer(generate_private_key_pem(), lifetime_seconds=60)
    verifier = issuer.verifier
    token = issuer.issue(subject="s-ada", email="ada@example.org", groups=["users"])
    first = verifier.verify(token)
    assert verifier.verify(token) == first == ADA
    header, payload, signature = token.split(".")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    with pytest.raises(InvalidToken):
        verifier.verify(f"{header}.{payload}.{flipped}")
    other = LocalTokenIssuer(generate_private_key_pem(), lifetime_seconds=60).issue(
        subject="s-ada", email="ada@example.org", groups=["users", "admins"]
    )
    with pytest.raises(InvalidToken):  # same claims shape, another key: checked, refused
        verifier.verify(other)


def test_an_expired_token_is_refused_even_after_it_was_accepted() -> None:
    pem = generate_private_key_pem()
    issuer = LocalTokenIssuer(pem, lifetime_seconds=1)
    private_key = serialization.load_pem_private_key(pem.encode(), password=None)
    verifier = JwtVerifier(
        key_resolver=lambda _token: private_key.public_key(),
        issuer=LOCAL_ISSUER,
        audience=LOCAL_AUDIENCE,
        algorithms=LOCAL_ALGORITHMS,
        groups_claim=GROUPS_CLAIM,
        name_claims=("email",),
        leeway_seconds=0,
    )
    token = issuer.issue(subject="s-ada", email="ada@example.org", groups=["users"])
    assert verifier.verify(token) == ADA
    expires_at = jwt.decode(token, options={"verify_signature": False})["exp"]
    time.sleep(max(0.0, expires_at - time.time()) + 0.05)
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token)
