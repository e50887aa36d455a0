"""Auth routes (contract section 1): sign-up, tokens, login cookie, who-am-I; with local
auth, or through the Cognito pool (``user_api.auth.cognito``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Response
from fastapi.security import OAuth2PasswordRequestForm

from labcloud.contract import Group
from labcloud.settings import AuthMode
from labcloud.web import TOKEN_COOKIE
from user_api.auth import service
from user_api.auth.cognito import CognitoAccounts
from user_api.auth.schemas import AccessInfo, CognitoInfo, TokenResponse, UserInfo
from user_api.dependencies import (
    AuthRoutesDep,
    CurrentUser,
    IssuerDep,
    OptionalCaller,
    SessionDep,
    SettingsDep,
)

router = APIRouter(tags=["auth"])
PasswordForm = Annotated[OAuth2PasswordRequestForm, Depends()]


@router.get("/access_info")
def access_info(settings: SettingsDep) -> AccessInfo:
    """How to get a token: the Cognito pool, or the ``/token`` route (local auth, or
    Cognito with its development routes on)."""
    routes = settings.auth is AuthMode.LOCAL or settings.cognito_auth_routes
    return AccessInfo(
        cognito=CognitoInfo(
            user_pool_id=settings.cognito_user_pool_id,
            client_id=settings.cognito_client_id,
            region=settings.cognito_region,
        ),
        auth=settings.auth.value,
        self_signup=routes and settings.allow_self_signup,
        token_url="/token" if routes else None,
    )


@router.get("/.well-known/jwks.json", include_in_schema=False)
def jwks(issuer: IssuerDep) -> dict[str, Any]:
    return issuer.jwks()


@router.post("/user", status_code=201)
def create_user(
    form: PasswordForm,
    session: SessionDep,
    settings: SettingsDep,
    routes: AuthRoutesDep,
    caller: OptionalCaller,
    groups: Annotated[list[Group] | None, Form()] = None,
) -> UserInfo:
    """Create an account (local auth, or the Cognito pool): anyone may sign up as a
    plain user when self-signup is on; an admin's token may create an account in
    any group."""
    create = (
        routes.create_account if isinstance(routes, CognitoAccounts) else service.create_account
    )
    user = create(
        session,
        email=form.username,
        password=form.password,
        groups=groups or [],
        creator=caller,
        self_signup_allowed=settings.allow_self_signup,
        signup_requires_approval=settings.signup_requires_approval,
    )
    return UserInfo(email=user.email, groups=list(user.groups))


@router.post("/token", status_code=201)
def token(form: PasswordForm, session: SessionDep, routes: AuthRoutesDep) -> TokenResponse:
    """Exchange an email and password for an ID token (local auth, or Cognito's)."""
    if isinstance(routes, CognitoAccounts):
        tokens = routes.token(form.username, form.password)
        return TokenResponse(id_token=tokens.id_token, expires_in=tokens.expires_in)
    user = service.authenticate(session, email=form.username, password=form.password)
    id_token, expires_in = service.issue_token(routes, user)
    return TokenResponse(id_token=id_token, expires_in=expires_in)


@router.post("/login")
def login(
    form: PasswordForm,
    response: Response,
    session: SessionDep,
    routes: AuthRoutesDep,
    settings: SettingsDep,
) -> UserInfo:
    """Sign in with an email and password; the ID token is set as an httpOnly
    cookie, accepted instead of the Authorization header."""
    if isinstance(routes, CognitoAccounts):
        tokens, principal = routes.login(form.username, form.password)
        id_token, expires_in = tokens.id_token, tokens.expires_in
        info = UserInfo(email=principal.name, groups=sorted(principal.groups))
    else:
        user = service.authenticate(session, email=form.username, password=form.password)
        id_token, expires_in = service.issue_token(routes, user)
        info = UserInfo(email=user.email, groups=list(user.groups))
    response.set_cookie(
        TOKEN_COOKIE,
        id_token,
        max_age=expires_in,
        httponly=True,
        secure=settings.public_url.startswith("https://"),
        samesite="lax",
    )
    return info


@router.get("/user")
def current_user(user: CurrentUser) -> UserInfo:
    """The caller's email and groups."""
    return UserInfo(email=user.email, groups=sorted(user.groups))
