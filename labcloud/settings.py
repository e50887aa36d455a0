"""Settings shared by the services, read from the environment and ``.env``.

Every service refuses to start on a missing or malformed setting and names it
(pydantic-settings does the naming); secrets are ``SecretStr`` so they never reach
logs or reprs, and may be Secrets Manager ARNs (resolved once at start).
"""

from __future__ import annotations

import hashlib
import hmac
from enum import StrEnum
from pathlib import Path
from typing import Self, TypeVar

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from labcloud.secrets import resolve_secret_setting

# Values that .env.example ships with; refused outside development so that a copied
# example file never becomes a production configuration.
_S = TypeVar("_S", bound=BaseSettings)

PLACEHOLDER_SECRETS = frozenset({"", "changethis", "change-me", "changeme"})


class AuthMode(StrEnum):
    LOCAL = "local"
    COGNITO = "cognito"


class FilesystemKind(StrEnum):
    LOCAL = "local"
    S3 = "s3"


class ServiceSettings(BaseSettings):
    """Settings every API has: auth, storage, the internal key."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    development: bool = Field(
        default=False,
        description="Development mode: allows placeholder secrets and verbose errors.",
    )
    log_level: str = "INFO"

    auth: AuthMode = AuthMode.LOCAL
    filesystem: FilesystemKind = FilesystemKind.LOCAL
    # With FILESYSTEM=s3, the key prefix inside S3_BUCKET ("" or "." for the top).
    user_data_root_path: Path = Path("./.labcloud/data")
    s3_region: str | None = None
    # An S3-compatible store or emulator (http://127.0.0.1:5000); None: AWS, or the
    # AWS_ENDPOINT_URL boto3 reads from the environment.
    s3_endpoint_url: str | None = None
    # Declared after the fields its check reads.
    s3_bucket: str | None = None

    internal_api_key_secret: SecretStr

    cognito_client_id: str | None = None
    cognito_secret: SecretStr | None = None
    cognito_user_pool_id: str | None = None
    cognito_region: str | None = None
    # Separate from the issuer so tests can point at a local Cognito emulator whose
    # tokens still name the real issuer.
    cognito_jwks_url: str | None = None
    cognito_issuer: str | None = None

    @field_validator("internal_api_key_secret", "cognito_secret")
    @classmethod
    def _resolve_service_secrets(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        return resolve_secret_setting(value, str(info.field_name).upper())

    @field_validator("s3_bucket")
    @classmethod
    def _check_bucket(cls, value: str | None, info: ValidationInfo) -> str | None:
        """With FILESYSTEM=s3, the bucket must exist and answer at start: a service
        that cannot store files says so in one line rather than at the first upload."""
        if value and info.data.get("filesystem") is FilesystemKind.S3:
            from labcloud.storage.s3 import check_bucket, key_prefix, s3_client

            key_prefix(info.data.get("user_data_root_path", ""))
            client = s3_client(
                region=info.data.get("s3_region"), endpoint_url=info.data.get("s3_endpoint_url")
            )
            check_bucket(client, value)
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        key = self.internal_api_key_secret.get_secret_value()
        if not self.development and (key.lower() in PLACEHOLDER_SECRETS or len(key) < 16):
            raise ValueError(
                "INTERNAL_API_KEY_SECRET must be a real secret of at least 16 characters "
                "(placeholders are only accepted with DEVELOPMENT=true)"
            )
        if self.auth is AuthMode.COGNITO:
            missing = [
                name
                for name, value in (
                    ("COGNITO_CLIENT_ID", self.cognito_client_id),
                    ("COGNITO_USER_POOL_ID", self.cognito_user_pool_id),
                    ("COGNITO_REGION", self.cognito_region),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"AUTH=cognito needs {', '.join(missing)}")
        if self.filesystem is FilesystemKind.S3 and not self.s3_bucket:
            raise ValueError("FILESYSTEM=s3 needs S3_BUCKET")
        return self

    @property
    def url_signing_key(self) -> bytes:
        """Key of the HMAC that signs local-storage URLs. Derived from the internal key
        so that both APIs agree on it without another shared secret."""
        return hmac.new(
            self.internal_api_key_secret.get_secret_value().encode(),
            b"labcloud signed urls v1",
            hashlib.sha256,
        ).digest()

    @property
    def resolved_cognito_issuer(self) -> str:
        return self.cognito_issuer or (
            f"https://cognito-idp.{self.cognito_region}.amazonaws.com/{self.cognito_user_pool_id}"
        )

    @property
    def resolved_cognito_jwks_url(self) -> str:
        return self.cognito_jwks_url or f"{self.resolved_cognito_issuer}/.well-known/jwks.json"


def describe_settings_error(exc: ValidationError) -> str:
    """One line per bad setting, named as its environment variable; never the value,
    which may be a secret."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]).upper() or "SETTINGS"
        lines.append(f"  {name}: {error['msg']}")
    return "\n".join(lines)


def load_settings(cls: type[_S], env_file: str | Path | None = None) -> _S:
    """Load settings from the environment and ``env_file`` (default: ``.env`` when it
    exists), or exit with status 2 and one line per bad setting (no traceback: this
    is a configuration error). A named file must exist: pydantic-settings would
    silently ignore it."""
    if env_file is not None and not Path(env_file).is_file():
        raise SystemExit(f"{cls.__name__}: env file not found: {env_file}")
    try:
        return cls(_env_file=env_file if env_file is not None else ".env")
    except ValidationError as exc:
        raise SystemExit(
            f"{cls.__name__}: invalid settings\n{describe_settings_error(exc)}"
        ) from None
