"""The least-privilege IAM policies of deploy/aws/iam/ allow exactly the AWS actions
each service's code calls (tests/aws_calls.py reads the code): a call added without
its permission fails here, and so does a permission nothing uses any more."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.aws_calls import (
    REPO_ROOT,
    Call,
    Repository,
    iam_actions,
    required_actions,
    service_calls,
)

POLICIES = REPO_ROOT / "deploy" / "aws" / "iam"
# Each policy and the package whose code runs under it.
SERVICES = {"user-api": "user_api", "worker-api": "worker_api", "runner": "worker_runner"}


def _policy(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((POLICIES / f"{name}.json").read_text())
    return document


def _statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    statements = policy["Statement"]
    return statements if isinstance(statements, list) else [statements]


def _allowed(policy: dict[str, Any]) -> set[str]:
    actions: set[str] = set()
    for statement in _statements(policy):
        action = statement["Action"]
        actions.update([action] if isinstance(action, str) else action)
    return actions


def test_there_is_a_policy_for_each_service_and_no_other() -> None:
    assert {path.stem for path in POLICIES.glob("*.json")} == set(SERVICES)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_policy_is_well_formed_and_names_each_action(name: str) -> None:
    policy = _policy(name)
    assert policy["Version"] == "2012-10-17"
    for statement in _statements(policy):
        assert statement["Effect"] == "Allow", statement
        assert statement.get("Resource"), f"{statement.get('Sid')}: a statement needs resources"
        assert "NotAction" not in statement and "NotResource" not in statement
        actions = statement["Action"]
        for action in [actions] if isinstance(actions, str) else actions:
            # Least privilege: every action named, never a wildcard.
            assert "*" not in action, f"{name}: {action}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_policy_allows_exactly_what_the_service_calls(name: str) -> None:
    needed = required_actions(service_calls(SERVICES[name]))
    allowed = _allowed(_policy(name))
    missing = {action: sorted(where) for action, where in needed.items() if action not in allowed}
    unused = sorted(allowed - set(needed))
    assert not missing, f"deploy/aws/iam/{name}.json lacks actions the code needs: {missing}"
    assert not unused, f"deploy/aws/iam/{name}.json allows actions no code calls: {unused}"


def test_the_services_call_aws_as_expected() -> None:
    # What each service's code calls today, in outline: a scan that found nothing
    # (a changed way of making clients) must not pass as "no permission needed".
    user_api = {call.operation for call in service_calls("user_api")}
    assert {"get_secret_value", "get_object", "head_object"} <= user_api
    runner = {(call.service, call.operation) for call in service_calls("worker_runner")}
    assert ("secretsmanager", "get_secret_value") in runner
    assert not any(service == "s3" for service, _ in runner), "runners move files by URL"


# -- the scanner, on code made for it ----------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_scanner_finds_calls_through_imports_and_ignores_unreached_code(
    tmp_path: Path,
) -> None:
    _write(
        tmp_path,
        {
            "shared/__init__.py": """
                from shared.store import Store
                from shared.unused import clean_up
            """,
            "shared/clients.py": """
                import boto3

                def s3_client():
                    return boto3.client("s3")
            """,
            "shared/store.py": """
                from shared.clients import s3_client

                class Store:
                    def __init__(self, client):
                        self._client = client

                    def write(self, key, body):
                        self._client.put_object(Bucket="b", Key=key, Body=body)

                    def keys(self):
                        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket="b")
                        return [item for page in pages for item in page.get("Contents", [])]

                    def upload_request(self, folder):
                        return self._client.generate_presigned_post("b", folder + "/${filename}")

                    def download_request(self, key):
                        return self._client.generate_presigned_url(
                            "get_object", Params={"Bucket": "b", "Key": key}
                        )
            """,
            "shared/unused.py": """
                def clean_up(client):
                    client.delete_object(Bucket="b", Key="k")
            """,
            "shared/login.py": """
                import boto3

                class Pool:
                    def __init__(self):
                        self._client = boto3.client("cognito-idp")

                    def login(self, user, password):
                        return self._client.initiate_auth(
                            ClientId="c", AuthFlow="USER_PASSWORD_AUTH", AuthParameters={}
                        )

                    def set_enabled(self, user, enabled):
                        call = "admin_enable_user" if enabled else "admin_disable_user"
                        getattr(self._client, call)(UserPoolId="p", Username=user)
            """,
            "shared/secret.py": """
                def read(arn):
                    import boto3

                    client = boto3.client("secretsmanager")
                    return client.get_secret_value(SecretId=arn)["SecretString"]
            """,
            "svc/__init__.py": "",
            "svc/main.py": """
                from shared import Store
                from shared import secret
                from shared.login import Pool

                def run(settings):
                    store = Store(None)
                    store.write("k", b"")
                    # pydantic's SecretStr, not Secrets Manager: no SecretId.
                    settings.password.get_secret_value()
                    return secret.read(settings.arn), Pool()
            """,
            "other/__init__.py": "",
            "other/main.py": """
                from shared.unused import clean_up

                def tidy(client):
                    clean_up(client)
            """,
        },
    )
    repo = Repository(tmp_path, ("shared", "svc", "other"))
    calls = service_calls("svc", repo)
    found = {(call.service, call.operation) for call in calls}
    assert found == {
        ("s3", "put_object"),
        ("s3", "list_objects_v2"),
        ("s3", "get_object"),
        ("cognito-idp", "initiate_auth"),
        ("cognito-idp", "admin_enable_user"),
        ("cognito-idp", "admin_disable_user"),
        ("secretsmanager", "get_secret_value"),
    }
    assert Call("secretsmanager", "get_secret_value", "shared/secret.py:6") in calls
    assert set(required_actions(calls)) == {
        "s3:PutObject",
        "s3:ListBucket",
        "s3:GetObject",
        "cognito-idp:AdminEnableUser",
        "cognito-idp:AdminDisableUser",
        "secretsmanager:GetSecretValue",
    }
    # Importing the module is not calling it; the code that does is another service's.
    assert ("s3", "delete_object") not in found
    assert {(c.service, c.operation) for c in service_calls("other", repo)} == {
        ("s3", "delete_object")
    }


@pytest.mark.parametrize(
    "code",
    [
        "import boto3\n\ndef make(name):\n    return boto3.client(name)\n",
        'import boto3\n\ndef bucket():\n    return boto3.resource("s3").Bucket("b")\n',
    ],
)
def test_scanner_refuses_calls_it_cannot_read(tmp_path: Path, code: str) -> None:
    _write(tmp_path, {"svc/__init__.py": "", "svc/aws.py": code})
    with pytest.raises(ValueError, match=r"svc/aws\.py:"):
        service_calls("svc", Repository(tmp_path, ("svc",)))


def test_operations_map_to_their_iam_actions() -> None:
    assert iam_actions("s3", "list_objects_v2") == ("s3:ListBucket",)
    assert iam_actions("s3", "upload_part") == ("s3:PutObject",)
    assert iam_actions("s3", "head_object") == ("s3:GetObject",)
    assert iam_actions("cognito-idp", "admin_add_user_to_group") == (
        "cognito-idp:AdminAddUserToGroup",
    )
    # Served without a signature: an app client needs no AWS credentials for them.
    assert iam_actions("cognito-idp", "initiate_auth") == ()
    assert iam_actions("cognito-idp", "sign_up") == ()
    with pytest.raises(KeyError, match="add it to S3_ACTIONS"):
        iam_actions("s3", "put_bucket_policy")
