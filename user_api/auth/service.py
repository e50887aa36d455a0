"""Accounts and local tokens."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace

from email_validator import EmailNotValidError, validate_email
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labcloud.auth import Principal
from labcloud.auth.local import LocalTokenIssuer
from labcloud.auth.passwords import hash_password, password_problem, verify_password
from labcloud.contract import Group
from labcloud.errors import BadRequest, Conflict, Forbidden, Unauthorized
from user_api.auth import repository
from user_api.limits import NO_LIMITS, UsageLimits, limits_of
from user_api.models import User

logger = logging.getLogger(__name__)

# Hash compared against when the account does not exist, so that a login attempt
# takes as long for an unknown email as for a wrong password.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


class AccountExists(Conflict):
    """An account with this email already exists."""


class SignupDisabled(Forbidden):
    """Self-signup is disabled: ask an administrator for an account."""


class WrongCredentials(Unauthorized):
    """Incorrect email or password."""


class AccountDisabled(Unauthorized):
    """This account is disabled."""


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    """The caller of a user API request, resolved to an account."""

    id: int
    subject: str
    email: str
    groups: frozenset[str]
    # False while a self-signed-up account waits for an admin's approval.
    is_approved: bool = True
    # The limits in force for this account (its own, else the settings' defaults).
    limits: UsageLimits = NO_LIMITS

    def has(self, group: Group) -> bool:
        return group.value in self.groups


def normalise_email(raw: str) -> str:
    try:
        return validate_email(raw, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise BadRequest(f"invalid email address: {exc}") from exc


def allowed_groups(
    groups: list[Group], *, creator: AuthenticatedUser | None, self_signup_allowed: bool
) -> set[Group]:
    """The groups a new account gets (``users`` when none are asked for), or why the
    caller may not create it: anonymous callers only a plain ``users`` account when
    self-signup is on, admins any groups, other accounts none."""
    requested = set(groups) or {Group.USERS}
    if creator is None or not creator.has(Group.ADMINS):
        if creator is not None:
            raise Forbidden("only admins can create accounts for others")
        if not self_signup_allowed:
            raise SignupDisabled()
        if requested != {Group.USERS}:
            raise Forbidden("self-signup creates plain 'users' accounts only")
    return requested


def create_account(
    session: Session,
    *,
    email: str,
    password: str,
    groups: list[Group],
    creator: AuthenticatedUser | None,
    self_signup_allowed: bool,
    signup_requires_approval: bool = False,
) -> User:
    """Create a local account. Anonymous callers may only create a plain ``users``
    account, and only when self-signup is on; it then waits for an admin's approval
    when ``signup_requires_approval``. Admins may create any groups."""
    requested = allowed_groups(groups, creator=creator, self_signup_allowed=self_signup_allowed)
    problem = password_problem(password)
    if problem:
        raise BadRequest(problem)
    email = normalise_email(email)
    if repository.get_by_email(session, email) is not None:
        raise AccountExists()
    user = User(
        subject=secrets.token_hex(16),
        email=email,
        password_hash=hash_password(password),
        groups=sorted(g.value for g in requested),
        is_approved=creator is not None or not signup_requires_approval,
    )
    try:
        with session.begin_nested():
            repository.add(session, user)
    except IntegrityError as exc:  # a concurrent signup with the same email
        raise AccountExists() from exc
    logger.info(
        "account created: %s groups=%s%s",
        email,
        user.groups,
        "" if user.is_approved else " (waits for approval)",
    )
    return user


def authenticate(session: Session, *, email: str, password: str) -> User:
    user = repository.get_by_email(session, email.strip())
    if user is None or user.password_hash is None:
        verify_password(password, _DUMMY_HASH)
        raise WrongCredentials()
    if not verify_password(password, user.password_hash):
        raise WrongCredentials()
    if not user.is_active:
        raise AccountDisabled()
    return user


def issue_token(issuer: LocalTokenIssuer, user: User) -> tuple[str, int]:
    token = issuer.issue(subject=user.subject, email=user.email, groups=list(user.groups))
    return token, issuer.lifetime_seconds


def resolve_caller(
    session: Session,
    principal: Principal,
    *,
    local: bool,
    default_limits: UsageLimits | None = None,
) -> AuthenticatedUser:
    """The account behind a verified token. Local accounts must exist and be active,
    and their groups come from the database (so changes apply at once); Cognito
    accounts are created on first sight with the token's groups. The account's
    limits are resolved against ``default_limits`` (unlimited when None)."""
    row = repository.caller_by_subject(session, principal.subject)
    if row is None:
        if local:
            raise Unauthorized("the account of this token no longer exists")
        user = repository.add(
            session,
            User(
                subject=principal.subject,
                email=principal.name,
                password_hash=None,
                groups=sorted(principal.groups),
                is_active=True,
                is_approved=True,
            ),
        )
        return _authenticated(user, default_limits)
    if not row.is_active:
        raise AccountDisabled()
    if not local and sorted(principal.groups) != list(row.groups):
        repository.set_groups(session, row.id, sorted(principal.groups))
        caller = _authenticated(row, default_limits)
        return replace(caller, groups=principal.groups)
    return _authenticated(row, default_limits)


def _authenticated(
    user: User | repository.CallerRow, default_limits: UsageLimits | None
) -> AuthenticatedUser:
    return AuthenticatedUser(
        id=user.id,
        subject=user.subject,
        email=user.email,
        groups=frozenset(user.groups),
        is_approved=user.is_approved,
        limits=limits_of(user, default_limits or NO_LIMITS),
    )


def ensure_bootstrap_admin(session: Session, *, email: str, password: str) -> None:
    """Create the first admin at start when configured and absent; never changes an
    existing account's password."""
    email = normalise_email(email)
    existing = repository.get_by_email(session, email)
    if existing is not None:
        if Group.ADMINS.value not in existing.groups:
            logger.warning("BOOTSTRAP_ADMIN_EMAIL %s exists but is not an admin", email)
        return
    problem = password_problem(password)
    if problem:
        raise ValueError(f"BOOTSTRAP_ADMIN_PASSWORD: {problem}")
    admin = User(
        subject=secrets.token_hex(16),
        email=email,
        password_hash=hash_password(password),
        groups=sorted([Group.USERS.value, Group.ADMINS.value]),
    )
    try:
        with session.begin_nested():
            repository.add(session, admin)
    except IntegrityError:  # another server process starting at the same time made it
        logger.info("bootstrap admin %s created by another process", email)
        return
    logger.info("bootstrap admin %s created", email)
