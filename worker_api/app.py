"""The worker API application: ``create_app`` and the lifespan owning its resources.

``app.state`` attributes (set by the lifespan unless noted):

- ``settings`` (``WorkerApiSettings``; set by ``create_app``)
- ``engine``, ``session_factory``: the queue database (migrated at start)
- ``verifier``: the ``TokenVerifier`` for workers' bearer tokens; tests may replace
  it after start-up
- ``storage`` (``Storage``), whose signed URLs (local storage) name this API
- ``queue_policy`` (``QueuePolicy``), ``queue_signals`` (``QueueSignals``)
- ``job_wakeup`` (``Wakeup``): a job was enqueued (status changes wake their relay
  through ``labcloud.outbox``)
- ``puller`` (``JobPuller``): long-polling pulls
- ``worker_presence`` (``WorkerPresence``): records which workers are connected
- ``http_client`` (``httpx.AsyncClient``), ``status_relay`` (the status outbox's ``Relay``)
- ``account_checker`` (``AccountChecker``): is a worker's account still active?
- ``background_tasks``: the reaper and the status relay
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import FastAPI

from labcloud.auth import TokenVerifier
from labcloud.auth.local import cognito_verifier, local_jwks_verifier
from labcloud.db import create_db_engine, make_session_factory, migrate
from labcloud.outbox import Backoff, Relay
from labcloud.settings import AuthMode
from labcloud.storage import Audience, LocalTransfers, UrlSigner, make_storage
from labcloud.web import install_error_handlers, install_request_guards
from worker_api.clients.accounts import AccountChecker
from worker_api.clients.user_api import UserApiClient
from worker_api.dependencies import SessionDep
from worker_api.files.endpoints import router as files_router
from worker_api.logs.endpoints import internal_router as logs_internal_router
from worker_api.logs.endpoints import router as logs_router
from worker_api.queue import service as queue_service
from worker_api.queue.endpoints import internal_router
from worker_api.queue.endpoints import router as queue_router
from worker_api.queue.policy import QueuePolicy, QueueSignals
from worker_api.queue.reaper import run_reaper
from worker_api.queue.service import JobPuller, Wakeup
from worker_api.queue.status_relay import UserApiStatusOutbox
from worker_api.settings import WorkerApiSettings
from worker_api.workers.endpoints import router as workers_router
from worker_api.workers.presence import WorkerPresence

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
logger = logging.getLogger(__name__)


def make_verifier(settings: WorkerApiSettings) -> TokenVerifier:
    """Tokens from the user API's local auth (its JWKS), or Cognito ID tokens."""
    if settings.auth is AuthMode.COGNITO:
        assert settings.cognito_client_id is not None, "checked by the settings"
        return cognito_verifier(
            jwks_url=settings.resolved_cognito_jwks_url,
            issuer=settings.resolved_cognito_issuer,
            client_id=settings.cognito_client_id,
        )
    return local_jwks_verifier(settings.resolved_local_jwks_url)


def access_info(settings: WorkerApiSettings) -> dict[str, Any]:
    """How workers get a token: the Cognito pool (upstream's shape), or local auth."""
    cognito = settings.auth is AuthMode.COGNITO
    return {
        "cognito": {
            "user_pool_id": settings.cognito_user_pool_id if cognito else None,
            "client_id": settings.cognito_client_id if cognito else None,
            "region": settings.cognito_region if cognito else None,
        },
        "auth": settings.auth.value,
    }


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: WorkerApiSettings = app.state.settings
    engine = create_db_engine(
        settings.resolved_database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
    )
    tasks: list[asyncio.Task[None]] = []
    app.state.account_checker = account_checker = AccountChecker(
        user_api_url=settings.userfacing_api_url,
        api_key=settings.internal_api_key_secret.get_secret_value(),
        ttl_seconds=settings.account_check_ttl_seconds,
        timeout_seconds=settings.account_check_timeout_seconds,
    )
    try:
        await anyio.to_thread.run_sync(migrate, engine, MIGRATIONS)
        factory = make_session_factory(engine)
        job_wakeup = Wakeup()
        policy = QueuePolicy(
            lease_seconds=settings.timeout_failure,
            max_retries=settings.max_retries,
            retry_different=settings.retry_different,
            cancel_log_grace_seconds=settings.cancel_log_grace_seconds,
        )
        signals = QueueSignals(job_enqueued=job_wakeup.notify)
        state = app.state
        state.engine = engine
        state.session_factory = factory
        state.verifier = make_verifier(settings)
        state.storage = make_storage(
            settings,
            transfers=LocalTransfers(
                UrlSigner(settings.url_signing_key),
                base_url=settings.public_url,
                audience=Audience.WORKER_API,
            ),
        )
        state.queue_policy = policy
        state.queue_signals = signals
        state.job_wakeup = job_wakeup
        state.puller = JobPuller(factory, policy, job_wakeup)
        state.worker_presence = WorkerPresence(
            factory,
            seen_window_seconds=settings.worker_seen_window_seconds,
            record_every_seconds=settings.worker_record_every_seconds,
        )
        async with httpx.AsyncClient(
            timeout=settings.status_forward_timeout_seconds
        ) as http_client:
            state.http_client = http_client
            user_api = UserApiClient(
                http_client,
                user_api_url=settings.userfacing_api_url,
                api_key=settings.internal_api_key_secret.get_secret_value(),
            )
            state.status_relay = Relay(
                UserApiStatusOutbox(user_api),
                factory,
                poll_seconds=settings.status_forward_poll_seconds,
                backoff=Backoff(
                    first_seconds=0.1, max_seconds=settings.status_forward_retry_max_seconds
                ),
            )
            tasks.append(
                asyncio.create_task(
                    run_reaper(
                        factory,
                        policy,
                        signals,
                        state.storage,
                        interval_seconds=settings.reaper_interval_seconds,
                    ),
                    name="worker_api reaper",
                )
            )
            tasks.append(
                asyncio.create_task(state.status_relay.run(), name="worker_api status relay")
            )
            state.background_tasks = tasks
            yield
            await _stop(tasks)
    finally:
        await _stop(tasks)
        account_checker.close()
        engine.dispose()


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()


def create_app(settings: WorkerApiSettings | None = None) -> FastAPI:
    """The worker API. Settings are read from the environment when not given."""
    resolved = settings or WorkerApiSettings()
    app = FastAPI(
        title="LabCloud worker API",
        description="The queue that workers pull jobs from, and their file transfers.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = resolved
    install_error_handlers(app)
    install_request_guards(app)

    @app.get("/access_info", tags=["auth"])
    def get_access_info() -> dict[str, Any]:
        """How to obtain a token for this API."""
        return access_info(resolved)

    @app.get("/health", tags=["health"])
    def get_health(session: SessionDep) -> dict[str, str]:
        """``{"status": "ok"}`` while this process serves and reaches its database
        (503 otherwise). No authentication: for load balancers and benchmarks."""
        queue_service.check_database(session)
        return {"status": "ok"}

    app.include_router(queue_router)
    app.include_router(files_router)
    app.include_router(internal_router)
    app.include_router(workers_router)
    app.include_router(logs_router)
    app.include_router(logs_internal_router)
    return app
