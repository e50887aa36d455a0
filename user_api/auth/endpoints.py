"""Local auth routes (contract section 1): sign-up, tokens, login cookie, who-am-I."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Response
from fastapi.security import OAuth2PasswordRequestForm

from labcloud.contract import Group
from labcloud.settings import AuthMode
from labcloud.web import TOKEN_COOKIE
from user_api.auth import service
from user_api.auth.schemas import AccessInfo, CognitoInfo, TokenResponse, UserInfo
from user_api.dependencies import (
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
    """How to get a token: the Cognito pool, or the local ``/token`` route."""
    local = settings.auth is AuthMode.LOCAL
    return AccessInfo(
        cognito=CognitoInfo(
            user_pool_id=settings.cognito_user_pool_id,
            client_id=settings.cognito_client_id,
            region=settings.cognito_region,
        ),
        auth=settings.auth.value,
        self_signup=local and settings.allow_self_signup,
        token_url="/token" if local else None,
    )


@router.get("/.well-known/jwks.json", include_in_schema=False)
def jwks(issuer: IssuerDep) -> dict[str, Any]:
    return issuer.jwks()


@router.post("/user", status_code=201)
def create_user(
    form: PasswordForm,
    session: SessionDep,
    settings: SettingsDep,
    _issuer: IssuerDep,
    caller: OptionalCaller,
    groups: Annotated[list[Group] | None, Form()] = None,
) -> UserInfo:
    """Create an account (local auth): anyone may sign up as a plain user when
    self-signup is on; an admin's token may create an account in any group."""
    user = service.create_account(
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
def token(form: PasswordForm, session: SessionDep, issuer: IssuerDep) -> TokenResponse:
    """Exchange an email and password for an ID token (local auth)."""
    user = service.authenticate(session, email=form.username, password=form.password)
    id_token, expires_in = service.issue_token(issuer, user)
    return TokenResponse(id_token=id_token, expires_in=expires_in)


@router.post("/login")
def login(
    form: PasswordForm,
    response: Response,
    session: SessionDep,
    issuer: IssuerDep,
    settings: SettingsDep,
) -> UserInfo:
    """Sign in with an email and password; the token is set as an httpOnly cookie,
    accepted instead of the Authorization header (local auth)."""
    user = service.authenticate(session, email=form.username, password=form.password)
    id_token, expires_in = service.issue_token(issuer, user)
    response.set_cookie(
        TOKEN_COOKIE,
        id_token,
        max_age=expires_in,
        httponly=True,
        secure=settings.public_url.startswith("https://"),
        samesite="lax",
    )
    return UserInfo(email=user.email, groups=list(user.groups))


@router.get("/user")
def current_user(user: CurrentUser) -> UserInfo:
    """The caller's email and groups."""
    return UserInfo(email=user.email, groups=sorted(user.groups))
