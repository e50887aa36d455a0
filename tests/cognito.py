"""A Cognito user pool on the session's moto server, as LabCloud's stacks set one up:
LabCloud's four groups and a public app client allowing ``USER_PASSWORD_AUTH`` and
``REFRESH_TOKEN_AUTH``. The pool's password policy asks for 8 characters with
lower-case letters and digits (``tests.user_api.helpers.PASSWORD`` passes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from labcloud.contract import Group
from tests.aws import MotoServer


@dataclass(frozen=True)
class CognitoPool:
    server: MotoServer
    pool_id: str
    client_id: str
    idp: Any  # boto3's cognito-idp client (untyped)
    # The app client's secret, when it was created with one.
    client_secret: str | None = None

    @property
    def region(self) -> str:
        return self.server.region

    @property
    def jwks_url(self) -> str:
        # moto serves the JWKS here; its tokens name the real issuer (TESTING.md).
        return f"{self.server.endpoint_url}/{self.pool_id}/.well-known/jwks.json"

    @property
    def issuer(self) -> str:
        return f"https://cognito-idp.{self.region}.amazonaws.com/{self.pool_id}"

    def settings(self) -> dict[str, Any]:
        """The Cognito settings of a service using this pool."""
        return {
            "auth": "cognito",
            "cognito_user_pool_id": self.pool_id,
            "cognito_client_id": self.client_id,
            "cognito_region": self.region,
            "cognito_jwks_url": self.jwks_url,
        }

    def add_user(self, email: str, password: str, *groups: Group) -> None:
        """A confirmed account in ``groups``, made by an administrator."""
        self.idp.admin_create_user(
            UserPoolId=self.pool_id,
            Username=email,
            UserAttributes=[{"Name": "email", "Value": email}],
            MessageAction="SUPPRESS",
        )
        self.idp.admin_set_user_password(
            UserPoolId=self.pool_id, Username=email, Password=password, Permanent=True
        )
        for group in groups:
            self.idp.admin_add_user_to_group(
                UserPoolId=self.pool_id, Username=email, GroupName=group.value
            )

    def login(self, email: str, password: str) -> str:
        """An ID token straight from the pool."""
        response = self.idp.initiate_auth(
            ClientId=self.client_id,
            AuthFlow="USER_PASSWORD_AUTH",
            AuthParameters={"USERNAME": email, "PASSWORD": password},
        )
        return str(response["AuthenticationResult"]["IdToken"])

    def groups_of(self, email: str) -> list[str]:
        response = self.idp.admin_list_groups_for_user(UserPoolId=self.pool_id, Username=email)
        return sorted(group["GroupName"] for group in response["Groups"])

    def user(self, email: str) -> dict[str, Any]:
        user: dict[str, Any] = self.idp.admin_get_user(UserPoolId=self.pool_id, Username=email)
        return user


def create_pool(
    server: MotoServer,
    name: str = "labcloud",
    *,
    with_secret: bool = False,
    email_usernames: bool = False,
) -> CognitoPool:
    """``email_usernames``: the pool signs in by email and names accounts by a UUID
    (``UsernameAttributes=["email"]``), as DECODE's pool and ``labcloud up
    --aws-emulator`` do."""
    idp = server.client("cognito-idp")
    pool_id = idp.create_user_pool(
        PoolName=name,
        **({"UsernameAttributes": ["email"]} if email_usernames else {}),
        Policies={
            "PasswordPolicy": {
                "MinimumLength": 8,
                "RequireUppercase": False,
                "RequireLowercase": True,
                "RequireNumbers": True,
                "RequireSymbols": False,
            }
        },
    )["UserPool"]["Id"]
    for group in Group:
        idp.create_group(UserPoolId=pool_id, GroupName=group.value)
    app_client = idp.create_user_pool_client(
        UserPoolId=pool_id,
        ClientName=f"{name}-app",
        ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
        GenerateSecret=with_secret,
    )["UserPoolClient"]
    return CognitoPool(
        server=server,
        pool_id=pool_id,
        client_id=app_client["ClientId"],
        idp=idp,
        client_secret=app_client.get("ClientSecret"),
    )
