"""The user API application: ``create_app`` and the lifespan owning its resources."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from labcloud.auth import TokenVerifier
from labcloud.auth.cognito import CognitoAppClient, CognitoUserPool
from labcloud.auth.jwt import JwtVerifier
from labcloud.auth.local import LocalTokenIssuer, cognito_verifier
from labcloud.db import create_db_engine, make_session_factory, migrate, unit_of_work
from labcloud.outbox import Backoff, Relay
from labcloud.settings import AuthMode, load_settings
from labcloud.storage.factory import make_storage
from labcloud.storage.signing import Audience, UrlSigner
from labcloud.storage.transfers import LocalTransfers
from labcloud.web import install_error_handlers, install_request_guards
from user_api import openapi as docs
from user_api.admin.endpoints import internal_router as admin_internal_router
from user_api.admin.endpoints import router as admin_router
from user_api.auth import service as auth_service
from user_api.auth.cognito import CognitoAccounts
from user_api.auth.endpoints import router as auth_router
from user_api.catalog.endpoints import router as catalog_router
from user_api.catalog.sources import catalog_source
from user_api.catalog.store import CatalogStore
from user_api.clients.worker_api import WorkerApiClient
from user_api.files.endpoints import router as files_router
from user_api.health import router as health_router
from user_api.jobs.endpoints import router as jobs_router
from user_api.jobs.log_endpoints import router as job_logs_router
from user_api.jobs.outbox import WorkerApiOutbox
from user_api.notifications.endpoints import router as notifications_router
from user_api.notifications.sender import build_email_sender
from user_api.settings import UserApiSettings

logger = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


# Names the env file that ``create_app()`` reads its settings from when it is given
# none: how ``python -m user_api --workers N --env-file F`` passes F to each worker.
ENV_FILE_VARIABLE = "LABCLOUD_USER_API_ENV_FILE"

MAX_REQUEST_BODY_BYTES = 1024 * 1024
"""The largest request body other than a file upload (README "Request limits")."""


def make_cognito_verifier(settings: UserApiSettings) -> JwtVerifier:
    """ID tokens of the pool's app client, checked against the pool's JWKS."""
    assert settings.cognito_client_id is not None, "checked by the settings"
    return cognito_verifier(
        jwks_url=settings.resolved_cognito_jwks_url,
        issuer=settings.resolved_cognito_issuer,
        client_id=settings.cognito_client_id,
    )


def make_cognito_accounts(settings: UserApiSettings, verifier: TokenVerifier) -> CognitoAccounts:
    """Sign-up, login and the admin API's changes in the Cognito user pool."""
    assert settings.cognito_client_id is not None, "checked by the settings"
    assert settings.cognito_user_pool_id is not None, "checked by the settings"
    secret = settings.cognito_secret.get_secret_value() if settings.cognito_secret else None
    return CognitoAccounts(
        app_client=CognitoAppClient(
            client_id=settings.cognito_client_id,
            region=settings.cognito_region,
            client_secret=secret,
        ),
        pool=CognitoUserPool(
            user_pool_id=settings.cognito_user_pool_id, region=settings.cognito_region
        ),
        verifier=verifier,
        confirm_signups=settings.cognito_confirm_signups,
    )


def create_app(settings: UserApiSettings | None = None) -> FastAPI:
    settings = settings or load_settings(UserApiSettings, os.environ.get(ENV_FILE_VARIABLE))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(
            settings.resolved_database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )
        migrate(engine, MIGRATIONS)
        sessions = make_session_factory(engine)
        email_sender = build_email_sender(settings, sessions)
        if email_sender is None:
            logger.info("email notifications off (EMAIL_SENDER_SERVICE is empty)")
        issuer: LocalTokenIssuer | None = None
        cognito_accounts: CognitoAccounts | None = None
        verifier: TokenVerifier
        if settings.auth is AuthMode.LOCAL:
            assert settings.local_auth_private_key is not None  # checked by the settings
            issuer = LocalTokenIssuer(
                settings.local_auth_private_key.get_secret_value(),
                lifetime_seconds=settings.token_lifetime_seconds,
            )
            verifier = issuer.verifier
            if settings.allow_self_signup:
                logger.warning("self-signup is ON (ALLOW_SELF_SIGNUP): a development setting")
        else:
            verifier = make_cognito_verifier(settings)
            cognito_accounts = make_cognito_accounts(settings, verifier)
            if settings.cognito_auth_routes:
                logger.warning(
                    "POST /user, /token and /login sign up and log in through Cognito "
                    "(COGNITO_AUTH_ROUTES): a development setting"
                )
        if settings.bootstrap_admin_email and settings.bootstrap_admin_password:
            with unit_of_work(sessions) as session:
                auth_service.ensure_bootstrap_admin(
                    session,
                    email=str(settings.bootstrap_admin_email),
                    password=settings.bootstrap_admin_password.get_secret_value(),
                )
        catalog_store = CatalogStore(
            catalog_source(
                settings.application_config_file,
                poll_seconds=settings.application_config_poll_seconds,
            )
        )
        client = httpx.AsyncClient(base_url=settings.workerfacing_api_url, timeout=30)
        # Requests that read from the worker API (live logs, progress, why a job
        # waits, connected workers) have a pool of their own: a follower holds a
        # connection for as long as it follows, and must not starve the outbox.
        reads = httpx.AsyncClient(
            base_url=settings.workerfacing_api_url,
            timeout=10,
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=50),
        )
        app.state.worker_api = WorkerApiClient(
            reads, settings.internal_api_key_secret.get_secret_value()
        )
        worker_outbox = Relay(
            WorkerApiOutbox(
                WorkerApiClient(client, settings.internal_api_key_secret.get_secret_value())
            ),
            sessions,
            poll_seconds=settings.forward_poll_seconds,
            backoff=Backoff(first_seconds=0.2, max_seconds=settings.forward_retry_max_seconds),
        )
        app.state.settings = settings
        app.state.engine = engine
        app.state.session_factory = sessions
        app.state.issuer = issuer
        app.state.verifier = verifier
        app.state.cognito_accounts = cognito_accounts
        app.state.storage = make_storage(
            settings,
            transfers=LocalTransfers(
                UrlSigner(settings.url_signing_key),
                base_url=settings.public_url,
                audience=Audience.USER_API,
            ),
        )
        app.state.catalog_store = catalog_store
        tasks = [
            asyncio.create_task(worker_outbox.run(), name="worker-outbox"),
            asyncio.create_task(catalog_store.watch(), name="catalog-watcher"),
        ]
        if email_sender is not None:
            tasks.append(asyncio.create_task(email_sender.run(), name="email-outbox"))
        logger.info("user API ready (auth=%s, storage=%s)", settings.auth, settings.filesystem)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()
            await reads.aclose()
            engine.dispose()

    app = FastAPI(
        title="LabCloud user API",
        version="0.1.0",
        lifespan=lifespan,
        description=docs.description(settings),
        swagger_ui_parameters={"persistAuthorization": True},
    )
    docs.install_docs(app, settings)
    if settings.frontend_url:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[settings.frontend_url],
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    install_error_handlers(app)
    install_request_guards(app, max_body_bytes=MAX_REQUEST_BODY_BYTES)
    app.include_router(health_router)
    app.include_router(auth_router)
    app.include_router(catalog_router)
    app.include_router(jobs_router)
    app.include_router(job_logs_router)
    app.include_router(files_router)
    app.include_router(admin_router)
    app.include_router(admin_internal_router)
    app.include_router(notifications_router)
    return app
