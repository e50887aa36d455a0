"""``labcloud up --aws-emulator``: the stack on a local AWS (moto's server).

``start_emulator`` runs ``python -m moto.server`` as one more service of the stack (so
it is stopped with it, after the APIs), ``provision`` creates what a deployment on AWS
has (docs/aws.md): the S3 bucket with the catalog object, the Cognito user pool with
LabCloud's groups and a public app client that allows ``USER_PASSWORD_AUTH``, and the
secrets in Secrets Manager; ``EmulatedAws.settings`` are the settings that point the
services at them. ``create_account`` makes an account in the pool as an administrator
would (confirmed, permanent password, groups).

moto keeps everything in memory: every start creates the resources anew, and whatever
the stack stored (accounts, files, results) is gone when it stops. The databases of
the mode are therefore started empty too (``STATE_FOLDER``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from labcloud.contract import Group
from labcloud.secrets import aws_error_reason
from labcloud_cli.stack.processes import Service, StartupError, start
from labcloud_cli.stack.setup import url

REGION = "us-east-1"  # the one region where a bucket needs no LocationConstraint
BUCKET = "labcloud-data"
CATALOG_KEY = "catalog/application_config.yaml"
# Key prefix of the users' files in the bucket (USER_DATA_ROOT_PATH with S3 storage).
DATA_PREFIX = "users"
POOL_NAME = "labcloud"
CLIENT_NAME = "labcloud-public"
INTERNAL_KEY_SECRET_NAME = "labcloud/internal-api-key"  # noqa: S105 - a name
# moto accepts any credentials; fixed ones keep a real profile or key of the machine's
# environment from ever reaching a request.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "labcloud-emulator", "AWS_SECRET_ACCESS_KEY": "emulator"}
# The user API's settings of local accounts, which have no use with the pool.
LOCAL_AUTH_SETTINGS = (
    "LOCAL_AUTH_PRIVATE_KEY",
    "BOOTSTRAP_ADMIN_EMAIL",
    "BOOTSTRAP_ADMIN_PASSWORD",
)
# Where the mode keeps its databases inside the data folder; emptied at each start.
STATE_FOLDER = "aws-emulator"
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Emulator:
    """A running emulator: the endpoint every AWS call of the stack goes to."""

    endpoint_url: str
    region: str = REGION

    def client(self, service: str) -> Any:
        """A boto3 client of ``service`` on the emulator (boto3's clients are untyped)."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def environment(self) -> dict[str, str]:
        """What points boto3 in a process at the emulator (secrets by ARN, the catalog,
        S3 storage, a runner's Cognito login all go through boto3)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            **CREDENTIALS,
        }


@dataclass(frozen=True)
class EmulatedAws:
    """The resources ``provision`` created."""

    emulator: Emulator
    bucket: str
    catalog_uri: str
    user_pool_id: str
    client_id: str
    internal_key_arn: str

    @property
    def issuer(self) -> str:
        # The issuer moto writes into its tokens: the real Cognito's, for this pool.
        return f"https://cognito-idp.{self.emulator.region}.amazonaws.com/{self.user_pool_id}"

    @property
    def jwks_url(self) -> str:
        return f"{self.emulator.endpoint_url}/{self.user_pool_id}/.well-known/jwks.json"

    def settings(self) -> dict[str, str]:
        """Settings of both APIs for these resources (S3 storage, Cognito, the internal
        key by ARN, boto3 pointed at the emulator)."""
        return {
            **self.emulator.environment(),
            "FILESYSTEM": "s3",
            "S3_BUCKET": self.bucket,
            "S3_REGION": self.emulator.region,
            "S3_ENDPOINT_URL": self.emulator.endpoint_url,
            "USER_DATA_ROOT_PATH": DATA_PREFIX,
            "AUTH": "cognito",
            "COGNITO_USER_POOL_ID": self.user_pool_id,
            "COGNITO_CLIENT_ID": self.client_id,
            "COGNITO_REGION": self.emulator.region,
            "COGNITO_JWKS_URL": self.jwks_url,
            "COGNITO_ISSUER": self.issuer,
            "INTERNAL_API_KEY_SECRET": self.internal_key_arn,
        }

    def user_api_settings(self) -> dict[str, str]:
        """The user API's own: the catalog on S3, checked for changes every few
        seconds (an upload of a new version takes effect quickly), and the
        development auth routes (sign-up and login through the pool), which the
        README's example session and DECODE's clients use."""
        return {
            "COGNITO_AUTH_ROUTES": "true",
            "APPLICATION_CONFIG_FILE": self.catalog_uri,
            "APPLICATION_CONFIG_POLL_SECONDS": "5",
        }

    def configure(self, user_env: dict[str, str], worker_env: dict[str, str]) -> None:
        """Point the settings of both APIs (changed in place) at these resources."""
        for env in (user_env, worker_env):
            env.update(self.settings())
        user_env.update(self.user_api_settings())
        for name in LOCAL_AUTH_SETTINGS:
            user_env.pop(name, None)

    def describe(self) -> str:
        """What was created, for the start message."""
        return (
            f"  S3 bucket       {self.bucket} (files under {DATA_PREFIX}/)\n"
            f"  catalog         {self.catalog_uri}\n"
            f"  user pool       {self.user_pool_id} (groups: "
            f"{', '.join(group.value for group in Group)})\n"
            f"  app client      {self.client_id} (public, USER_PASSWORD_AUTH)\n"
            f"  secret          {self.internal_key_arn} (INTERNAL_API_KEY_SECRET)"
        )


def inherited_aws_variables() -> tuple[str, ...]:
    """The AWS variables of this process's environment, which the services must not
    inherit in this mode: a profile, a session token or a per-service endpoint
    (``AWS_ENDPOINT_URL_S3``) would send their calls to a real account or elsewhere."""
    return tuple(name for name in os.environ if name.upper().startswith("AWS_"))


def fresh_state_folder(data_dir: Path) -> Path:
    """The folder of this mode's databases in ``data_dir``, emptied: what they would
    remember (accounts, files, jobs) went with the previous emulator."""
    folder = data_dir / STATE_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def check_installed() -> None:
    """``StartupError`` unless moto's server can run in this environment."""
    missing = [module for module in ("moto", "flask") if importlib.util.find_spec(module) is None]
    if missing:
        raise StartupError(
            "--aws-emulator runs moto's server, which is not installed here "
            f"(missing: {', '.join(missing)}); install it with `pip install 'moto[server]'` "
            "(`poetry install` installs it with the development dependencies)"
        )


def start_emulator(
    host: str, port: int, endpoint_host: str, data_dir: Path, services: list[Service]
) -> Emulator:
    """Start moto's server on ``host:port`` as a service of the stack (appended to
    ``services``) and wait until it answers at ``endpoint_host:port``."""
    check_installed()
    args = ["moto.server", "--host", host, "--port", str(port)]
    # Batch's job containers (``--backend aws-batch``) share the host's network, so
    # that they reach what listens on 127.0.0.1, as a Batch host in the deployment's
    # VPC reaches its services. moto uses the setting for nothing else.
    environment = {"MOTO_DOCKER_NETWORK_MODE": "host"}
    services.append(start("aws-emulator", args, environment, data_dir))
    emulator = Emulator(endpoint_url=url(endpoint_host, port))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if services[-1].process.poll() is not None:
            raise StartupError("the AWS emulator exited; see logs/aws-emulator.log")
        try:
            if httpx.get(f"{emulator.endpoint_url}/moto-api/", timeout=2).status_code == 200:
                return emulator
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise StartupError(f"the AWS emulator did not answer within {READY_TIMEOUT_S:.0f} s")


def provision(emulator: Emulator, *, catalog: Path, internal_api_key: str) -> EmulatedAws:
    """Create the bucket and its catalog object, the user pool with its groups and
    public app client, and the internal key's secret."""
    try:
        body = catalog.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the catalog {catalog}: {exc.strerror}") from None
    s3 = emulator.client("s3")
    with step("create the S3 bucket"):
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key=CATALOG_KEY, Body=body)
    idp = emulator.client("cognito-idp")
    with step("create the Cognito user pool"):
        pool_id = idp.create_user_pool(
            PoolName=POOL_NAME,
            # Accounts are named by their email address, as in DECODE's pool.
            UsernameAttributes=["email"],
            AutoVerifiedAttributes=["email"],
            # LabCloud checks passwords itself (labcloud.auth.passwords); the pool's
            # policy must not refuse what that rule accepts.
            Policies={
                "PasswordPolicy": {
                    "MinimumLength": 8,
                    "RequireUppercase": False,
                    "RequireLowercase": False,
                    "RequireNumbers": False,
                    "RequireSymbols": False,
                }
            },
        )["UserPool"]["Id"]
        for group in Group:
            idp.create_group(UserPoolId=pool_id, GroupName=group.value)
        client_id = idp.create_user_pool_client(
            UserPoolId=pool_id,
            ClientName=CLIENT_NAME,
            GenerateSecret=False,
            ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
        )["UserPoolClient"]["ClientId"]
    with step("create the secrets"):
        arn = emulator.client("secretsmanager").create_secret(
            Name=INTERNAL_KEY_SECRET_NAME, SecretString=internal_api_key
        )["ARN"]
    return EmulatedAws(
        emulator=emulator,
        bucket=BUCKET,
        catalog_uri=f"s3://{BUCKET}/{CATALOG_KEY}",
        user_pool_id=pool_id,
        client_id=client_id,
        internal_key_arn=arn,
    )


def create_account(aws: EmulatedAws, email: str, password: str, groups: Iterable[Group]) -> None:
    """An account in the pool as an administrator makes it: no invitation, the email
    verified, ``password`` permanent (no change asked at first login), in ``groups``."""
    idp = aws.emulator.client("cognito-idp")
    with step(f"create the account {email} in the user pool"):
        idp.admin_create_user(
            UserPoolId=aws.user_pool_id,
            Username=email,
            UserAttributes=[
                {"Name": "email", "Value": email},
                {"Name": "email_verified", "Value": "true"},
            ],
            MessageAction="SUPPRESS",
        )
        idp.admin_set_user_password(
            UserPoolId=aws.user_pool_id, Username=email, Password=password, Permanent=True
        )
        for group in groups:
            idp.admin_add_user_to_group(
                UserPoolId=aws.user_pool_id, Username=email, GroupName=group.value
            )


@contextmanager
def step(what: str) -> Iterator[None]:
    """Turns any failure of an AWS call into a ``StartupError`` saying what was being
    done and AWS's error code."""
    try:
        yield
    except Exception as exc:  # botocore raises a family of untyped errors
        raise StartupError(f"cannot {what} on the AWS emulator ({aws_error_reason(exc)})") from exc
