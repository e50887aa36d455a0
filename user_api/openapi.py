"""What ``/docs`` (FastAPI's OpenAPI UI) shows: how to get a token and try each
route with it.

Two ways to send a token are declared on every route that takes one:

- ``bearerAuth`` (``labcloud.web.bearer_scheme``): paste an ID token;
- ``passwordAuth``, where this API has a token route (local accounts, or Cognito
  with COGNITO_AUTH_ROUTES): the OAuth2 password flow at ``POST /token``, so that
  the UI's "Authorize" button takes an email and a password. ``/token`` answers
  with the ``id_token`` of the HTTP contract (DECODE's clients read it), not an
  OAuth2 ``access_token``: the scheme's ``x-tokenName`` tells the UI which field
  to send.

The token URL is relative (``token``), so that it stays right behind a proxy that
serves the API under a path prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from labcloud.settings import AuthMode
from user_api.settings import UserApiSettings

PASSWORD_SCHEME = "passwordAuth"  # noqa: S105 (a scheme's name)
BEARER_SCHEME = "bearerAuth"
TOKEN_URL = "token"  # noqa: S105 (a route)


def token_routes(settings: UserApiSettings) -> bool:
    """Whether ``POST /token`` exchanges a password for a token on this server."""
    return settings.auth is AuthMode.LOCAL or settings.cognito_auth_routes


def description(settings: UserApiSettings) -> str:
    """The text at the top of ``/docs``: what the API is for, and how to try it."""
    hours = settings.token_lifetime_seconds / 3600
    lines = [
        "Upload data, start jobs from the application catalog, get results.",
        "",
        "## Try the routes on this page",
        "",
    ]
    if token_routes(settings):
        signup = (
            "sign up with `POST /user` (email and password), or ask an administrator"
            if settings.allow_self_signup
            else "ask an administrator (`labcloud admin`) to create it"
        )
        lines += [
            f"1. Get an account: {signup}.",
            "2. Click **Authorize**, and under **passwordAuth** enter your email as "
            "*username* and your password (leave *client_id* and *client_secret* empty): "
            "this page asks `POST /token` for an ID token and sends it with every request. "
            "Or call `POST /token` below (*Try it out*), copy its `id_token` and paste it "
            "under **bearerAuth**.",
        ]
    else:
        lines += [
            "1. Get an account in the Cognito user pool named by `GET /access_info`.",
            "2. Get an ID token from that pool (for example `labcloud login`, which keeps "
            "it in your config folder), click **Authorize** and paste it under "
            "**bearerAuth**.",
        ]
    lifetime = (
        f" A token from `POST /token` is good for {hours:g} hours; then authorize again."
        if settings.auth is AuthMode.LOCAL
        else ""
    )
    lines += [
        "3. Open a route, click *Try it out*, then *Execute*. Routes with a padlock need "
        "the token; those under `/admin` need an account in group `admins`." + lifetime,
        "",
        "From scripts, send `Authorization: Bearer <id_token>`. The command-line client "
        "`labcloud` (`labcloud login`, `labcloud run --wait`, ...) does this for you.",
    ]
    return "\n".join(lines)


def install_docs(app: FastAPI, settings: UserApiSettings) -> None:
    """Add the password flow to the OpenAPI document where ``/token`` exists."""
    if not token_routes(settings):
        return
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        add_password_flow(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_password_flow(schema: dict[str, Any]) -> None:
    """Declare ``passwordAuth`` and accept it wherever ``bearerAuth`` is."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[PASSWORD_SCHEME] = {
        "type": "oauth2",
        "description": (
            "Your email (username) and password: POST /token answers with an ID token, "
            "sent as a bearer token."
        ),
        "flows": {"password": {"tokenUrl": TOKEN_URL, "scopes": {}}},
        "x-tokenName": "id_token",
    }
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            security = operation.get("security")
            if isinstance(security, list) and {BEARER_SCHEME: []} in security:
                security.append({PASSWORD_SCHEME: []})
