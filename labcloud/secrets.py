"""Secret values from settings: either the value itself or an AWS Secrets Manager ARN.

Settings such as ``INTERNAL_API_KEY_SECRET`` or ``DATABASE_SECRET`` may hold the
secret or the ARN of a Secrets Manager secret holding it; a JSON secret with a
``password`` key (the shape RDS-managed secrets have) is unwrapped.
"""

from __future__ import annotations

import json
import re
from typing import Any

from labcloud.errors import LabCloudError

_ARN = re.compile(r"^arn:aws[\w-]*:secretsmanager:(?P<region>[a-z0-9-]+):\d{12}:secret:.+$")


class SecretResolutionError(LabCloudError):
    """A secret could not be read from AWS Secrets Manager."""


def is_secret_arn(value: str) -> bool:
    return _ARN.match(value) is not None


def resolve_secret(value: str) -> str:
    """Return ``value``, or the secret it names when it is a Secrets Manager ARN."""
    match = _ARN.match(value)
    if match is None:
        return _unwrap(value)
    import boto3  # imported lazily: only deployments that use ARNs need AWS access

    client: Any = boto3.client("secretsmanager", region_name=match.group("region"))
    try:
        response = client.get_secret_value(SecretId=value)
    except Exception as exc:  # botocore raises a family of untyped errors
        raise SecretResolutionError(f"cannot read secret {value}: {exc}") from exc
    secret = response.get("SecretString")
    if not isinstance(secret, str):
        raise SecretResolutionError(f"secret {value} has no string value")
    return _unwrap(secret)


def _unwrap(secret: str) -> str:
    if secret.startswith("{"):
        try:
            document = json.loads(secret)
        except json.JSONDecodeError:
            return secret
        if isinstance(document, dict) and isinstance(document.get("password"), str):
            return str(document["password"])
    return secret
