"""Accounts in a Cognito user pool (``AUTH=cognito``).

``CognitoAccounts`` serves the development auth routes (``POST /user``, ``/token``,
``/login`` when ``COGNITO_AUTH_ROUTES`` is on) as DECODE's user API does: sign-up,
the admin's confirmation where configured, ``USER_PASSWORD_AUTH``; and it is the
``AccountPool`` the admin API changes accounts in (approve, groups, disable), before
it records the change in LabCloud's database. With local auth there is no pool and
the admin API changes the database only.

A Cognito account's LabCloud row is keyed by its ``sub``; its groups are those its
tokens carry (``cognito:groups``), so a change made in the pool shows in the
account's next token. An account that signed up while ``SIGNUP_REQUIRES_APPROVAL``
is on is in no group until an admin approves it (which adds it to ``users``).
"""

from __future__ import annotations

import logging
from typing import Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labcloud.auth import Principal, TokenVerifier
from labcloud.auth.cognito import CognitoAppClient, CognitoTokens, CognitoUserPool
from labcloud.contract import Group
from user_api.auth import repository
from user_api.auth.service import (
    AccountExists,
    AuthenticatedUser,
    allowed_groups,
    normalise_email,
)
from user_api.models import User

logger = logging.getLogger(__name__)


class AccountPool(Protocol):
    """Where accounts live besides LabCloud's database; the admin API makes its
    changes there first, so a refused change is not recorded."""

    def find(self, email: str) -> User | None:
        """A new row for an account the pool has and LabCloud's database does not yet
        (a worker never calls the user API), or None when the pool has none."""
        ...

    def create(self, email: str, password: str, groups: list[str]) -> User:
        """Create an account that can log in with ``password`` at once, in ``groups``;
        the new row to record (the caller adds it)."""
        ...

    def approve(self, email: str) -> None:
        """Let an account that waits for approval use the service."""
        ...

    def set_groups(self, email: str, groups: list[str]) -> None:
        """Make ``groups`` the account's groups."""
        ...

    def set_active(self, email: str, active: bool) -> None:
        """Disable an account (no more logins) or enable it again."""
        ...


class CognitoAccounts:
    """Sign-up, login and admin changes against one user pool and app client."""

    def __init__(
        self,
        *,
        app_client: CognitoAppClient,
        pool: CognitoUserPool,
        verifier: TokenVerifier,
        confirm_signups: bool,
    ) -> None:
        self._app = app_client
        self._pool = pool
        self._verifier = verifier
        self._confirm = confirm_signups

    # -- the development auth routes ------------------------------------------------

    def create_account(
        self,
        session: Session,
        *,
        email: str,
        password: str,
        groups: list[Group],
        creator: AuthenticatedUser | None,
        self_signup_allowed: bool,
        signup_requires_approval: bool,
    ) -> User:
        """Sign the account up in the pool (the pool's password policy applies),
        confirm it when ``confirm_signups``, put it in its groups, and record it.
        Who may create which groups is as with local accounts."""
        requested = allowed_groups(groups, creator=creator, self_signup_allowed=self_signup_allowed)
        email = normalise_email(email)
        if repository.get_by_email(session, email) is not None:
            raise AccountExists()
        subject = self._app.sign_up(email, password)
        waits = creator is None and signup_requires_approval
        if self._confirm:
            self._pool.confirm_sign_up(email)
        granted = [] if waits else sorted(group.value for group in requested)
        for group in granted:
            self._pool.add_to_group(email, group)
        user = User(
            subject=subject,
            email=email,
            password_hash=None,
            groups=granted,
            is_approved=not waits,
        )
        try:
            with session.begin_nested():
                repository.add(session, user)
        except IntegrityError as exc:  # a concurrent sign-up with the same email
            raise AccountExists() from exc
        logger.info(
            "Cognito account created: %s groups=%s%s",
            email,
            granted,
            " (waits for approval)" if waits else "",
        )
        return user

    def token(self, email: str, password: str) -> CognitoTokens:
        """An ID token for an email and password (``USER_PASSWORD_AUTH``)."""
        return self._app.login(email.strip(), password)

    def login(self, email: str, password: str) -> tuple[CognitoTokens, Principal]:
        """Tokens, and who they name (the ID token verified as any request's)."""
        tokens = self.token(email, password)
        return tokens, self._verifier.verify(tokens.id_token)

    # -- AccountPool ----------------------------------------------------------------

    def find(self, email: str) -> User | None:
        email = normalise_email(email)
        subject = self._pool.subject_of(email)
        if subject is None:
            return None
        return User(
            subject=subject,
            email=email,
            password_hash=None,
            groups=self._pool.groups_of(email),
            is_approved=True,
        )

    def create(self, email: str, password: str, groups: list[str]) -> User:
        email = normalise_email(email)
        subject = self._pool.create_account(email, password)
        for group in sorted(groups):
            self._pool.add_to_group(email, group)
        return User(
            subject=subject,
            email=email,
            password_hash=None,
            groups=sorted(groups),
            is_approved=True,
        )

    def approve(self, email: str) -> None:
        self._pool.confirm_sign_up(email)
        self._pool.add_to_group(email, Group.USERS.value)

    def set_groups(self, email: str, groups: list[str]) -> None:
        # From the groups the pool holds, which LabCloud's row may lag behind (it is
        # updated when the account's next token is seen).
        before = set(self._pool.groups_of(email))
        for group in sorted(set(groups) - before):
            self._pool.add_to_group(email, group)
        for group in sorted(before - set(groups)):
            self._pool.remove_from_group(email, group)

    def set_active(self, email: str, active: bool) -> None:
        self._pool.set_enabled(email, active)
