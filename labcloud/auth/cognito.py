"""Amazon Cognito user pools: login, sign-up and the admin calls LabCloud makes.

Used by the user API (its development auth routes and the admin API acting on the
pool) and by the runner (a worker logs in as DECODE's worker does). boto3 finds the
endpoint (``AWS_ENDPOINT_URL`` for emulators) and credentials itself; the login and
sign-up calls need no AWS credentials, the ``admin_*`` calls do.

Cognito's errors become LabCloud's (``labcloud.errors``), with a clear message and
the HTTP status a route answers: a wrong password 401, an existing account 409, a
password the pool's policy refuses 400, Cognito unreachable or misconfigured 503.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from labcloud.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    LabCloudError,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)

logger = logging.getLogger(__name__)

# A request to Cognito gives up within seconds: a login or an admin change waits on
# it, and botocore's defaults wait a minute.
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 10
MAX_ATTEMPTS = 3


class WrongCredentials(Unauthorized):
    """Incorrect email or password."""


class AccountDisabled(Unauthorized):
    """This account is disabled."""


class AccountNotConfirmed(Forbidden):
    """This account is not confirmed yet."""


class NewPasswordRequired(Forbidden):
    """This account must set a new password before it can log in."""


class AccountExists(Conflict):
    """An account with this email already exists."""


class WeakPassword(BadRequest):
    """The password does not meet the user pool's password policy."""


class AccountNotInPool(NotFound):
    """The account does not exist in the Cognito user pool."""


class CognitoUnavailable(Unavailable):
    """Cognito could not be reached or refused LabCloud's configuration."""


@dataclass(frozen=True, slots=True)
class CognitoTokens:
    """What a successful login returns; ``refresh_token`` only from a password login."""

    id_token: str
    expires_in: int
    refresh_token: str | None = None


def secret_hash(username: str, client_id: str, client_secret: str) -> str:
    """The ``SECRET_HASH`` an app client with a secret requires: base64 of
    HMAC-SHA256(secret, username + client id)."""
    digest = hmac.new(
        client_secret.encode(), (username + client_id).encode(), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode()


def cognito_client(region: str | None) -> Any:
    """A boto3 ``cognito-idp`` client with short timeouts (boto3 is untyped)."""
    import boto3  # imported lazily: only Cognito deployments need it loaded
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
    )
    return boto3.client("cognito-idp", region_name=region, config=config)


# What each Cognito error code means, whatever the call; codes not listed mean that
# Cognito is unreachable or that LabCloud's configuration is wrong (503).
_BY_CODE: dict[str, type[LabCloudError]] = {
    "NotAuthorizedException": WrongCredentials,
    "UserNotFoundException": AccountNotInPool,
    "UserNotConfirmedException": AccountNotConfirmed,
    "PasswordResetRequiredException": NewPasswordRequired,
    "UsernameExistsException": AccountExists,
    "AliasExistsException": AccountExists,
    "InvalidPasswordException": WeakPassword,
    "InvalidParameterException": BadRequest,
    "TooManyRequestsException": TooManyRequests,
    "TooManyFailedAttemptsException": TooManyRequests,
    "LimitExceededException": TooManyRequests,
}


@contextmanager
def _cognito_errors(what: str, *, login: bool = False) -> Iterator[None]:
    """Turn botocore's errors of ``what`` into LabCloud errors. For a login an
    unknown account is a wrong password (no account oracle), and a disabled account
    says so."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")) or None
        if login and code == "UserNotFoundException":
            raise WrongCredentials() from exc
        if code == "NotAuthorizedException":
            if message and "disabled" in message.lower():
                raise AccountDisabled() from exc
            if login:
                raise WrongCredentials() from exc
            # An admin call Cognito refused: LabCloud's credentials lack a permission.
            raise CognitoUnavailable(f"Cognito refused {what}: {message}") from exc
        kind = _BY_CODE.get(code)
        if kind is None:
            logger.error("Cognito %s failed: %s %s", what, code, message)
            raise CognitoUnavailable(f"Cognito {what} failed ({code or 'error'})") from exc
        if kind in (BadRequest, WeakPassword):
            raise kind(message or kind.__doc__) from exc
        raise kind() from exc
    except BotoCoreError as exc:
        logger.error("Cognito %s failed: %s", what, exc)
        raise CognitoUnavailable(f"Cognito cannot be reached ({what})") from exc


def _tokens(response: dict[str, Any]) -> CognitoTokens:
    if "ChallengeName" in response:
        if response["ChallengeName"] == "NEW_PASSWORD_REQUIRED":
            raise NewPasswordRequired()
        raise Forbidden(
            f"this account needs the {response['ChallengeName']} challenge, "
            "which LabCloud's password login does not answer"
        )
    result = response["AuthenticationResult"]
    return CognitoTokens(
        id_token=str(result["IdToken"]),
        expires_in=int(result["ExpiresIn"]),
        refresh_token=str(result["RefreshToken"]) if result.get("RefreshToken") else None,
    )


class CognitoAppClient:
    """What an app client of the pool can do without AWS credentials: sign up and
    log in (``USER_PASSWORD_AUTH``, ``REFRESH_TOKEN_AUTH``), with the ``SECRET_HASH``
    when the app client has a secret."""

    def __init__(
        self, *, client_id: str, region: str | None, client_secret: str | None = None
    ) -> None:
        self.client_id = client_id
        self._secret = client_secret
        self._client = cognito_client(region)

    def _with_hash(self, username: str, parameters: dict[str, str], key: str) -> dict[str, str]:
        if self._secret:
            parameters[key] = secret_hash(username, self.client_id, self._secret)
        return parameters

    def login(self, username: str, password: str) -> CognitoTokens:
        """Tokens for a username (an email) and password."""
        parameters = self._with_hash(
            username, {"USERNAME": username, "PASSWORD": password}, "SECRET_HASH"
        )
        with _cognito_errors("login", login=True):
            response = self._client.initiate_auth(
                ClientId=self.client_id, AuthFlow="USER_PASSWORD_AUTH", AuthParameters=parameters
            )
        return _tokens(response)

    def refresh(self, refresh_token: str, username: str) -> CognitoTokens:
        """New tokens from a refresh token. ``username`` is the token's
        ``cognito:username`` (the hash of an app client with a secret needs it)."""
        parameters = self._with_hash(username, {"REFRESH_TOKEN": refresh_token}, "SECRET_HASH")
        with _cognito_errors("token refresh", login=True):
            response = self._client.initiate_auth(
                ClientId=self.client_id, AuthFlow="REFRESH_TOKEN_AUTH", AuthParameters=parameters
            )
        return _tokens(response)

    def sign_up(self, email: str, password: str) -> str:
        """Create an unconfirmed account named by its email; returns its ``sub``."""
        arguments: dict[str, Any] = {
            "ClientId": self.client_id,
            "Username": email,
            "Password": password,
            "UserAttributes": [{"Name": "email", "Value": email}],
        }
        if self._secret:
            arguments["SecretHash"] = secret_hash(email, self.client_id, self._secret)
        with _cognito_errors("sign-up"):
            response = self._client.sign_up(**arguments)
        return str(response["UserSub"])


class CognitoUserPool:
    """The admin calls on the pool (they need AWS credentials allowed to make them).
    Accounts are named by their email, which is their username or a username
    attribute of the pool."""

    def __init__(self, *, user_pool_id: str, region: str | None) -> None:
        self.user_pool_id = user_pool_id
        self._client = cognito_client(region)

    def confirm_sign_up(self, username: str) -> None:
        """Confirm an account without the code Cognito would send; an account
        already confirmed stays so."""
        with _cognito_errors("confirmation"):
            user = self._client.admin_get_user(UserPoolId=self.user_pool_id, Username=username)
            if user.get("UserStatus") == "UNCONFIRMED":
                self._client.admin_confirm_sign_up(UserPoolId=self.user_pool_id, Username=username)

    def create_account(self, email: str, password: str) -> str:
        """Create a confirmed account named by its email, with a permanent password
        and no invitation message (an admin hands the password over); returns its
        ``sub``."""
        with _cognito_errors("account creation"):
            response = self._client.admin_create_user(
                UserPoolId=self.user_pool_id,
                Username=email,
                UserAttributes=[
                    {"Name": "email", "Value": email},
                    {"Name": "email_verified", "Value": "true"},
                ],
                MessageAction="SUPPRESS",
            )
            self._client.admin_set_user_password(
                UserPoolId=self.user_pool_id, Username=email, Password=password, Permanent=True
            )
        attributes = {
            item["Name"]: item["Value"] for item in response["User"].get("Attributes", [])
        }
        return str(attributes.get("sub") or response["User"]["Username"])

    def add_to_group(self, username: str, group: str) -> None:
        with _cognito_errors("adding to a group"):
            self._client.admin_add_user_to_group(
                UserPoolId=self.user_pool_id, Username=username, GroupName=group
            )

    def remove_from_group(self, username: str, group: str) -> None:
        with _cognito_errors("removing from a group"):
            self._client.admin_remove_user_from_group(
                UserPoolId=self.user_pool_id, Username=username, GroupName=group
            )

    def subject_of(self, username: str) -> str | None:
        """The account's ``sub`` (its tokens' subject), or None when the pool has no
        such account."""
        try:
            with _cognito_errors("looking up an account"):
                user = self._client.admin_get_user(UserPoolId=self.user_pool_id, Username=username)
        except AccountNotInPool:
            return None
        attributes = {item["Name"]: item["Value"] for item in user.get("UserAttributes", [])}
        return str(attributes.get("sub") or user["Username"])

    def groups_of(self, username: str) -> list[str]:
        with _cognito_errors("listing groups"):
            pages = self._client.get_paginator("admin_list_groups_for_user").paginate(
                UserPoolId=self.user_pool_id, Username=username
            )
            return sorted(group["GroupName"] for page in pages for group in page["Groups"])

    def set_enabled(self, username: str, enabled: bool) -> None:
        """Disabling stops logins and refreshes; tokens already issued stay valid
        until they expire (LabCloud refuses them by its own account state)."""
        call = "admin_enable_user" if enabled else "admin_disable_user"
        with _cognito_errors("enabling" if enabled else "disabling"):
            getattr(self._client, call)(UserPoolId=self.user_pool_id, Username=username)


class CognitoLogin:
    """One account's tokens, as a program that logs in (LabCloud's runner) keeps
    them: a password login first, then ``REFRESH_TOKEN_AUTH`` while the refresh
    token lasts, and a password login again once Cognito refuses it."""

    def __init__(self, app_client: CognitoAppClient, username: str, password: str) -> None:
        self._app = app_client
        self._username = username
        self._password = password
        self._refresh_token: str | None = None
        # The pool's name of the account (``cognito:username``), which the refresh's
        # SECRET_HASH needs: a pool that signs in by email names accounts by a UUID.
        self._pool_username = username
        self.refreshes = 0

    def tokens(self) -> CognitoTokens:
        """Fresh tokens (``WrongCredentials``, ``AccountDisabled``, ... when refused)."""
        if self._refresh_token is not None:
            try:
                tokens = self._app.refresh(self._refresh_token, self._pool_username)
            except (WrongCredentials, AccountNotInPool):
                logger.info("refresh token of %s refused: logging in again", self._username)
                self._refresh_token = None
            else:
                self.refreshes += 1
                return tokens
        tokens = self._app.login(self._username, self._password)
        self._refresh_token = tokens.refresh_token
        self._pool_username = _pool_username(tokens.id_token) or self._username
        return tokens


def _pool_username(id_token: str) -> str | None:
    """``cognito:username`` of a token Cognito just issued to this program (read, not
    verified: only the SECRET_HASH of the next refresh depends on it)."""
    import jwt

    try:
        claims = jwt.decode(id_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    name = claims.get("cognito:username")
    return name if isinstance(name, str) and name else None
