"""Who is calling: the result of verifying a bearer token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from labcloud.contract import Group
from labcloud.errors import Unauthorized


class InvalidToken(Unauthorized):
    """The token is missing, expired or not validly signed."""


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller. ``subject`` is the stable account id (the ``sub`` claim),
    ``name`` the account's login name (email for users, the worker's name)."""

    subject: str
    name: str
    groups: frozenset[str]

    def has(self, group: Group) -> bool:
        return group.value in self.groups


class TokenVerifier(Protocol):
    def verify(self, token: str) -> Principal:
        """Return the caller a token names, or raise ``InvalidToken``."""
        ...
