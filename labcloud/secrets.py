"""Secret values from settings: either the value itself or an AWS Secrets Manager ARN.

Settings documented as "value or ARN" (``INTERNAL_API_KEY_SECRET``, ``COGNITO_SECRET``,
``DATABASE_SECRET``, ``QUEUE_DB_SECRET``, ``LOCAL_AUTH_PRIVATE_KEY``,
``EMAIL_SENDER_SECRET_KEY``, the runner's ``PASSWORD``) may hold the secret or the ARN
of a Secrets Manager secret holding it. Each is resolved once, when its settings are
loaded, through boto3, which honours ``AWS_ENDPOINT_URL`` (emulators) and the usual
credential chain. A JSON secret with a ``password`` key (the shape RDS-managed secrets
have) is unwrapped to that password.

Errors name the setting and the reason, never the setting's value: the value may be
the secret itself, and an error message ends up in logs.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import SecretStr

from labcloud.errors import LabCloudError

_ARN = re.compile(r"^arn:aws[\w-]*:secretsmanager:(?P<region>[a-z0-9-]+):\d{12}:secret:.+$")

# A service that cannot read its secrets must say so within seconds at start rather
# than after botocore's default minute-long connection attempts.
_CONNECT_TIMEOUT_SECONDS = 5
_READ_TIMEOUT_SECONDS = 10
_MAX_ATTEMPTS = 3


class SecretResolutionError(LabCloudError, ValueError):
    """A secret could not be read from AWS Secrets Manager.

    A ``ValueError`` too, so that raised from a settings validator it is reported by
    pydantic as an invalid setting, like any other.
    """


def is_secret_arn(value: str) -> bool:
    return _ARN.match(value) is not None


def resolve_secret(value: str, setting: str = "a secret setting") -> str:
    """Return ``value``, or the secret it names when it is a Secrets Manager ARN.

    ``setting`` names the setting in error messages (``DATABASE_SECRET``).
    """
    match = _ARN.match(value)
    if match is None:
        return _unwrap(value)
    import boto3  # imported lazily: only deployments that use ARNs need AWS access
    from botocore.config import Config

    config = Config(
        connect_timeout=_CONNECT_TIMEOUT_SECONDS,
        read_timeout=_READ_TIMEOUT_SECONDS,
        retries={"total_max_attempts": _MAX_ATTEMPTS, "mode": "standard"},
    )
    try:
        client: Any = boto3.client(
            "secretsmanager", region_name=match.group("region"), config=config
        )
        response = client.get_secret_value(SecretId=value)
    except Exception as exc:  # botocore raises a family of untyped errors
        raise SecretResolutionError(
            f"{setting} names a Secrets Manager secret that cannot be read "
            f"({aws_error_reason(exc)})"
        ) from None
    secret = response.get("SecretString")
    if not isinstance(secret, str):
        raise SecretResolutionError(
            f"{setting} names a Secrets Manager secret without a string value "
            "(binary secrets are not supported)"
        )
    return _unwrap(secret)


def resolve_secret_setting(value: SecretStr | None, setting: str) -> SecretStr | None:
    """``resolve_secret`` for an optional ``SecretStr`` setting (settings validators)."""
    if value is None:
        return None
    return SecretStr(resolve_secret(value.get_secret_value(), setting))


def aws_error_reason(exc: Exception) -> str:
    """What went wrong in an AWS call: AWS's error code (``AccessDeniedException``), or
    the exception's class for failures without one (``EndpointConnectionError``).
    Never the exception's text: botocore's messages quote the resource's identifier."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if isinstance(code, str) and code:
            return code
    return type(exc).__name__


def _unwrap(secret: str) -> str:
    if secret.startswith("{"):
        try:
            document = json.loads(secret)
        except json.JSONDecodeError:
            return secret
        if isinstance(document, dict) and isinstance(document.get("password"), str):
            return str(document["password"])
    return secret
