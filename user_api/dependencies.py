"""``Annotated`` dependency aliases of the user API. Resources live on ``app.state``
(created by the lifespan in ``user_api.app``).

Dependencies that only read ``app.state`` or the already resolved caller are
``async def``: FastAPI runs sync dependencies in the thread pool, and a thread hop
per dependency is a measurable share of a request's CPU time. Those that touch the
database stay sync."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from labcloud.auth import Principal, TokenVerifier
from labcloud.auth.local import LocalTokenIssuer
from labcloud.contract import Group
from labcloud.db import (
    after_commit,
    first_statement_locks_writers,
    request_unit_of_work,
    unit_of_work,
)
from labcloud.errors import Forbidden, NotFound
from labcloud.settings import AuthMode
from labcloud.storage.base import Storage
from labcloud.storage.local import LocalStorage, signed_url_storage
from labcloud.web import (
    TOKEN_COOKIE,
    BearerScheme,
    InternalKeyScheme,
    bearer_token,
    check_internal_key,
)
from user_api.auth.cognito import AccountPool, CognitoAccounts
from user_api.auth.service import AuthenticatedUser, resolve_caller
from user_api.catalog.store import CatalogStore
from user_api.clients.worker_api import WorkerApiClient
from user_api.files.usage import StorageUsageLedger
from user_api.limits import default_limits
from user_api.settings import UserApiSettings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One unit of work per request: committed when the endpoint returns (before the
    response is sent, see ``scope="function"`` below), rolled back on error.
    Callbacks registered with ``after_commit`` run once the commit succeeded."""
    async with request_unit_of_work(request.app.state.session_factory) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_settings(request: Request) -> UserApiSettings:
    settings: UserApiSettings = request.app.state.settings
    return settings


SettingsDep = Annotated[UserApiSettings, Depends(get_settings)]


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


StorageDep = Annotated[Storage, Depends(get_storage)]


async def get_worker_api(request: Request) -> WorkerApiClient:
    """The worker API's internal routes, for requests that read from it."""
    client: WorkerApiClient = request.app.state.worker_api
    return client


WorkerApiDep = Annotated[WorkerApiClient, Depends(get_worker_api)]


async def get_storage_usage(request: Request) -> StorageUsageLedger:
    """The count of bytes each account stores, on this API's database and storage."""
    return StorageUsageLedger.of_app(request.app.state)


StorageUsageDep = Annotated[StorageUsageLedger, Depends(get_storage_usage)]


async def get_signed_url_storage(request: Request) -> LocalStorage:
    """The storage, for the routes that redeem its signed URLs: 404 unless it is a
    local storage (which signs them for this API)."""
    return signed_url_storage(request.app.state.storage)


SignedUrlStorageDep = Annotated[LocalStorage, Depends(get_signed_url_storage)]


async def get_catalog_store(request: Request) -> CatalogStore:
    store: CatalogStore = request.app.state.catalog_store
    return store


CatalogStoreDep = Annotated[CatalogStore, Depends(get_catalog_store)]


async def get_issuer(request: Request) -> LocalTokenIssuer:
    issuer: LocalTokenIssuer | None = request.app.state.issuer
    if issuer is None:
        raise NotFound("local auth is disabled on this server (AUTH=cognito)")
    return issuer


IssuerDep = Annotated[LocalTokenIssuer, Depends(get_issuer)]


async def get_auth_routes(request: Request) -> LocalTokenIssuer | CognitoAccounts:
    """What serves ``POST /user``, ``/token`` and ``/login``: the local issuer, or the
    Cognito pool when ``COGNITO_AUTH_ROUTES`` is on (404 otherwise)."""
    issuer: LocalTokenIssuer | None = request.app.state.issuer
    if issuer is not None:
        return issuer
    settings: UserApiSettings = request.app.state.settings
    accounts: CognitoAccounts | None = request.app.state.cognito_accounts
    if accounts is None or not settings.cognito_auth_routes:
        raise NotFound(
            "with AUTH=cognito, sign up and log in through the Cognito user pool "
            "(these routes need COGNITO_AUTH_ROUTES=true)"
        )
    return accounts


AuthRoutesDep = Annotated[LocalTokenIssuer | CognitoAccounts, Depends(get_auth_routes)]


async def get_account_pool(request: Request) -> AccountPool | None:
    """The Cognito pool the admin API changes accounts in; None with local auth."""
    accounts: CognitoAccounts | None = request.app.state.cognito_accounts
    return accounts


AccountPoolDep = Annotated[AccountPool | None, Depends(get_account_pool)]


def _verify(request: Request) -> Principal:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier.verify(bearer_token(request))


def get_optional_caller(
    request: Request, session: SessionDep, _scheme: BearerScheme = None
) -> AuthenticatedUser | None:
    """The caller when a token is sent, None for anonymous requests."""
    if "authorization" not in request.headers and TOKEN_COOKIE not in request.cookies:
        return None
    return get_caller(request, session)


def get_caller(
    request: Request, session: SessionDep, _scheme: BearerScheme = None
) -> AuthenticatedUser:
    """Any authenticated account, whatever its groups."""
    settings: UserApiSettings = request.app.state.settings
    return resolve_caller(
        session,
        _verify(request),
        local=settings.auth is AuthMode.LOCAL,
        default_limits=default_limits(settings),
    )


Caller = Annotated[AuthenticatedUser, Depends(get_caller)]
OptionalCaller = Annotated[AuthenticatedUser | None, Depends(get_optional_caller)]


class AwaitingApproval(Forbidden):
    """Your account is waiting for an administrator's approval."""


def _approved(caller: AuthenticatedUser) -> AuthenticatedUser:
    if not caller.is_approved:
        raise AwaitingApproval("your account is waiting for an administrator's approval")
    return caller


async def get_current_user(caller: Caller) -> AuthenticatedUser:
    # Approval first: a Cognito account waiting for it is in no group yet.
    _approved(caller)
    if not caller.has(Group.USERS):
        raise Forbidden("this route needs an account in group 'users'")
    return caller


CurrentUser = Annotated[AuthenticatedUser, Depends(get_current_user)]


def _resolve(request: Request, session: Session) -> AuthenticatedUser:
    settings: UserApiSettings = request.app.state.settings
    return resolve_caller(
        session,
        _verify(request),
        local=settings.auth is AuthMode.LOCAL,
        default_limits=default_limits(settings),
    )


def _caller_in_own_transaction(request: Request, _scheme: BearerScheme) -> AuthenticatedUser:
    with unit_of_work(request.app.state.session_factory) as session:
        return _resolve(request, session)


def _caller_before_writes(
    request: Request, session: SessionDep, _scheme: BearerScheme
) -> AuthenticatedUser:
    # On PostgreSQL a read locks nothing, so the request's own transaction serves
    # (one transaction fewer per request); ``session`` starts none until it is used.
    if first_statement_locks_writers(request.app.state.session_factory):
        return _caller_in_own_transaction(request, _scheme)
    return _resolve(request, session)


async def get_current_user_before_writes(
    caller: Annotated[AuthenticatedUser, Depends(_caller_before_writes)],
) -> AuthenticatedUser:
    """``CurrentUser`` read without taking SQLite's write lock (in a short
    transaction of its own there): a route can then do slow checks (storage
    look-ups) before its unit of work takes the lock."""
    return await get_current_user(caller)


CurrentUserBeforeWrites = Annotated[AuthenticatedUser, Depends(get_current_user_before_writes)]


async def get_current_user_outside_transactions(
    caller: Annotated[AuthenticatedUser, Depends(_caller_in_own_transaction)],
) -> AuthenticatedUser:
    """``CurrentUser`` read in a short transaction that ends before the route runs,
    for routes that move files: they hold no database connection (nor SQLite's
    write lock) while a file streams."""
    return await get_current_user(caller)


CurrentUserOutsideTransactions = Annotated[
    AuthenticatedUser, Depends(get_current_user_outside_transactions)
]


async def get_current_admin(caller: Caller) -> AuthenticatedUser:
    if not caller.has(Group.ADMINS):
        raise Forbidden("this route needs an account in group 'admins'")
    return _approved(caller)


CurrentAdmin = Annotated[AuthenticatedUser, Depends(get_current_admin)]


async def require_internal_key(request: Request, _scheme: InternalKeyScheme = None) -> None:
    settings: UserApiSettings = request.app.state.settings
    check_internal_key(request, settings.internal_api_key_secret.get_secret_value())


InternalCaller = Depends(require_internal_key)

__all__ = [
    "AccountPoolDep",
    "AuthRoutesDep",
    "CatalogStoreDep",
    "CurrentAdmin",
    "CurrentUser",
    "CurrentUserBeforeWrites",
    "InternalCaller",
    "IssuerDep",
    "OptionalCaller",
    "SessionDep",
    "SettingsDep",
    "SignedUrlStorageDep",
    "StorageDep",
    "StorageUsageDep",
    "WorkerApiDep",
    "after_commit",
]
