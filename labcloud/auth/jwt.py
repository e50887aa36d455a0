"""JWT verification with pinned algorithms, for local tokens and Cognito ID tokens."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from labcloud.auth.principal import InvalidToken, Principal

KeyResolver = Callable[[str], Any]
logger = logging.getLogger(__name__)


class VerifiedTokens:
    """Tokens whose signature and claims were checked, remembered until they expire
    (at most ``max_age`` seconds, so that a signing key withdrawn from a JWKS stops
    being trusted soon after), the least recently used dropped beyond ``size``.

    A client sends the same token with every request until it expires; checking an
    Ed25519 or RSA signature each time costs a share of a short request's CPU.
    Keyed by the whole token, so any change to it is a miss. Whether the account
    may still act is checked on every request by the caller, not cached here."""

    def __init__(self, *, size: int = 4096, max_age: float = 300.0) -> None:
        self._size = size
        self._max_age = max_age
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token: str) -> Principal | None:
        now = time.time()
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                return None
            until, principal = entry
            if now >= until:
                del self._entries[token]
                return None
            self._entries.move_to_end(token)
            return principal

    def put(self, token: str, principal: Principal, expires_at: float) -> None:
        until = min(expires_at, time.time() + self._max_age)
        with self._lock:
            self._entries[token] = (until, principal)
            self._entries.move_to_end(token)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


class JwtVerifier:
    """Verifies signature, ``exp``, ``iss``, ``aud`` and ``token_use`` of an ID token.

    The algorithm list is fixed by the caller and never taken from the token header,
    which rules out algorithm-confusion attacks (``none``, HS256 with a public key).
    """

    def __init__(
        self,
        *,
        key_resolver: KeyResolver,
        issuer: str,
        audience: str,
        algorithms: list[str],
        groups_claim: str,
        name_claims: tuple[str, ...],
        token_use: str | None = "id",  # noqa: S107 - a claim value, not a password
        leeway_seconds: int = 5,
    ) -> None:
        self._key_resolver = key_resolver
        self._issuer = issuer
        self._audience = audience
        self._algorithms = algorithms
        self._groups_claim = groups_claim
        self._name_claims = name_claims
        self._token_use = token_use
        self._leeway = leeway_seconds
        self._verified = VerifiedTokens()

    def verify(self, token: str) -> Principal:
        principal = self._verified.get(token)
        if principal is None:
            principal, expires_at = self._check(token)
            self._verified.put(token, principal, expires_at)
        return principal

    def _check(self, token: str) -> tuple[Principal, float]:
        try:
            key = self._key_resolver(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("token expired") from exc
        except (jwt.PyJWTError, ValueError) as exc:
            raise InvalidToken(f"invalid token: {exc}") from exc
        if self._token_use is not None and claims.get("token_use") != self._token_use:
            raise InvalidToken(f"invalid token: token_use must be {self._token_use!r}")
        groups = claims.get(self._groups_claim) or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise InvalidToken(f"invalid token: {self._groups_claim} must be a list of strings")
        name = next((str(claims[c]) for c in self._name_claims if claims.get(c)), claims["sub"])
        principal = Principal(subject=str(claims["sub"]), name=name, groups=frozenset(groups))
        return principal, float(claims["exp"])


class JwksKeys:
    """Signing keys of a JWKS endpoint, matched by the token's ``kid``.

    The set is fetched on first use and kept; a token naming a ``kid`` the set lacks
    makes it fetch again (keys rotate), at most once per ``refresh_interval``, so
    tokens with made-up ``kid`` values cannot turn every request into a fetch. A set
    older than ``max_age`` is fetched again on next use (a withdrawn key stops being
    trusted); if that fetch fails, the keys held are kept until one succeeds. While
    no set was ever fetched, a failed fetch is retried after ``retry_interval`` (the
    issuer may start after this service). Every fetch has a ``timeout``."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        refresh_interval: float = 30.0,
        retry_interval: float = 1.0,
        max_age: float = 3600.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._refresh_interval = refresh_interval
        self._retry_interval = retry_interval
        self._max_age = max_age
        self._transport = transport
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None  # of the set held
        self._attempted_at: float | None = None  # of the last fetch, good or not

    def __call__(self, token: str) -> Any:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"invalid token: {exc}") from exc
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("invalid token: its header names no signing key (kid)")
        with self._lock:
            now = time.monotonic()
            if self._fetched_at is None or now - self._fetched_at >= self._max_age:
                self._fetch_if_due(now, self._retry_interval)
            elif kid not in self._keys:
                self._fetch_if_due(now, self._refresh_interval)
            if self._fetched_at is None:
                raise InvalidToken("cannot fetch the signing keys (JWKS)")
            key = self._keys.get(kid)
        if key is None:
            raise InvalidToken("invalid token: unknown signing key")
        return key

    def _fetch_if_due(self, now: float, interval: float) -> None:
        if self._attempted_at is not None and now - self._attempted_at < interval:
            return
        self._attempted_at = now
        try:
            with httpx.Client(timeout=self._timeout, transport=self._transport) as client:
                response = client.get(self._url)
                response.raise_for_status()
                document = response.json()
            keys = {
                str(key.key_id): key.key
                for key in jwt.PyJWKSet.from_dict(document).keys
                if key.key_id and key.public_key_use in (None, "sig")
            }
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
            logger.warning("cannot fetch signing keys from %s: %s", self._url, exc)
            return
        self._keys = keys
        self._fetched_at = now


def jwks_key_resolver(jwks_url: str) -> KeyResolver:
    """Keys from a JWKS endpoint (``JwksKeys`` with its default timings)."""
    return JwksKeys(jwks_url)
