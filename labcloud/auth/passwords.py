"""Password hashing with scrypt (memory-hard, in the standard library)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string

# n=2**14, r=8, p=1: the parameters RFC 7914 recommends for interactive logins
# (~16 MiB and ~50 ms per hash).
_N, _R, _P = 2**14, 8, 1
_PREFIX = "scrypt"
# URL- and shell-safe: generated passwords go into env files and form fields.
_ALPHABET = string.ascii_letters + string.digits + "-_"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return "$".join([_PREFIX, str(_N), str(_R), str(_P), _b64(salt), _b64(digest)])


def verify_password(password: str, encoded: str) -> bool:
    try:
        prefix, n, r, p, salt, digest = encoded.split("$")
        if prefix != _PREFIX:
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def password_problem(password: str) -> str | None:
    """Why a password is too weak, or None."""
    if len(password) < 8:
        return "password must have at least 8 characters"
    if password.isdigit() or password.isalpha():
        return "password must mix letters with digits or symbols"
    return None


def generate_password(length: int = 24) -> str:
    """A random password that ``password_problem`` always accepts.

    ``token_urlsafe`` alone is all letters about once in 150 draws (24 characters
    of 64, 52 of them letters), which the rule refuses: a start that generates
    one then fails. Drawing again until the rule passes keeps the full entropy of
    every accepted draw."""
    if length < 8:
        raise ValueError("generated passwords have at least 8 characters")
    while True:
        candidate = "".join(secrets.choice(_ALPHABET) for _ in range(length))
        if password_problem(candidate) is None:
            return candidate


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
