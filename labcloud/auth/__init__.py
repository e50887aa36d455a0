"""Token verification shared by both APIs, and local-auth issuing for the user API."""

from labcloud.auth.principal import InvalidToken, Principal, TokenVerifier

__all__ = ["InvalidToken", "Principal", "TokenVerifier"]
