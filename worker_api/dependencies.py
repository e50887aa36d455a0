"""Request-scoped dependencies: the unit of work, the caller, the services, the
storage and the account checker.

Dependencies that only read ``app.state`` are ``async def``: FastAPI runs sync
dependencies in the thread pool, and a hop per dependency is a measurable share of
a pull's CPU time. Those that may block (the database, the account check) stay sync.

Everything long-lived is created by the lifespan (``worker_api.app``) and read here
from ``app.state``; see ``create_app`` for the attribute names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from labcloud.auth import Principal, TokenVerifier
from labcloud.contract import Environment, Group
from labcloud.db import request_unit_of_work
from labcloud.errors import Forbidden, Unauthorized
from labcloud.storage import LocalStorage, Storage, signed_url_storage
from labcloud.web import BearerScheme, InternalKeyScheme, bearer_token, check_internal_key
from worker_api.clients.accounts import AccountChecker
from worker_api.queue.policy import QueuePolicy, QueueSignals
from worker_api.queue.service import JobPuller
from worker_api.settings import WorkerApiSettings


def get_settings(request: Request) -> WorkerApiSettings:
    settings: WorkerApiSettings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One transaction per request, committed before the response is sent (the
    dependency is used with ``scope="function"``) and rolled back on error."""
    async with request_unit_of_work(request.app.state.session_factory) as session:
        yield session


class AccountDisabled(Unauthorized):
    """This account is disabled."""


def current_worker(request: Request, _scheme: BearerScheme = None) -> Principal:
    """The calling worker, whose account must still be active on the user API
    (``AccountChecker``: cached for ACCOUNT_CHECK_TTL_SECONDS, failing open when the
    user API is down). A sync dependency: verification fetches signing keys and the
    account check asks the user API over HTTP, which must not block the event loop."""
    verifier: TokenVerifier = request.app.state.verifier
    principal = verifier.verify(bearer_token(request))
    if not principal.has(Group.WORKERS):
        raise Forbidden("only accounts in group 'workers' may use the worker API")
    checker: AccountChecker = request.app.state.account_checker
    if not checker.is_active(principal.subject):
        raise AccountDisabled()
    return principal


async def require_internal_key(request: Request, _scheme: InternalKeyScheme = None) -> None:
    """Only the user API, holding the internal key, may call the internal routes."""
    check_internal_key(request, get_settings(request).internal_api_key_secret.get_secret_value())


def worker_environment(principal: Principal) -> Environment:
    """Workers whose account is also in group ``cloud`` pull cloud jobs."""
    return Environment.CLOUD if principal.has(Group.CLOUD) else Environment.LOCAL


async def settings_dependency(request: Request) -> WorkerApiSettings:
    return get_settings(request)


SettingsDep = Annotated[WorkerApiSettings, Depends(settings_dependency)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
CurrentWorker = Annotated[Principal, Depends(current_worker)]
InternalCaller = Depends(require_internal_key)


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


async def get_signed_url_storage(request: Request) -> LocalStorage:
    """The storage, for the routes that redeem its signed URLs: 404 unless it is a
    local storage (which signs them for this API)."""
    return signed_url_storage(request.app.state.storage)


async def get_account_checker(request: Request) -> AccountChecker:
    checker: AccountChecker = request.app.state.account_checker
    return checker


async def get_puller(request: Request) -> JobPuller:
    puller: JobPuller = request.app.state.puller
    return puller


async def get_queue_policy(request: Request) -> QueuePolicy:
    policy: QueuePolicy = request.app.state.queue_policy
    return policy


async def get_queue_signals(request: Request) -> QueueSignals:
    signals: QueueSignals = request.app.state.queue_signals
    return signals


StorageDep = Annotated[Storage, Depends(get_storage)]
SignedUrlStorageDep = Annotated[LocalStorage, Depends(get_signed_url_storage)]
AccountsDep = Annotated[AccountChecker, Depends(get_account_checker)]
PullerDep = Annotated[JobPuller, Depends(get_puller)]
QueuePolicyDep = Annotated[QueuePolicy, Depends(get_queue_policy)]
QueueSignalsDep = Annotated[QueueSignals, Depends(get_queue_signals)]
