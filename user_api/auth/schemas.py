from __future__ import annotations

from pydantic import BaseModel


class UserInfo(BaseModel):
    email: str
    groups: list[str]


class TokenResponse(BaseModel):
    id_token: str
    expires_in: int


class CognitoInfo(BaseModel):
    user_pool_id: str | None
    client_id: str | None
    region: str | None


class AccessInfo(BaseModel):
    cognito: CognitoInfo
    # Extensions: how to get a token when local auth is on.
    auth: str
    self_signup: bool
    token_url: str | None
