"""``labcloud up --aws-emulator`` as a newcomer runs it: the console script starts
moto's server and the whole stack on it, and the README's example session works
unchanged, through Cognito, S3 and the Docker runner.

One stack for the module: the example session as printed (sign-up and login through
Cognito, an upload, the demo job run by the runner, which logs in through Cognito, its
results downloaded); then what lies beyond it (the files are objects in the bucket,
presigned transfers straight to S3, the accounts in the pool, the env file's settings
in force); last, stopping the stack stops the emulator."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from labcloud_cli.stack import aws_emulator
from labcloud_cli.stack.setup import read_env_file
from tests.e2e.aws_stack import EmulatedStack, emulated_stack
from tests.waiting import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.e2e, pytest.mark.timeout(600)]
FRONTEND = "http://frontend.example.org"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedStack]:
    # Settings for every service: FRONTEND_URL shows in the user API's CORS answers,
    # the runner's poll settings make the test quicker.
    settings = f"FRONTEND_URL={FRONTEND}\nTIMEOUT_JOB=1\nWAIT=2\n"
    with emulated_stack(tmp_path_factory.mktemp("aws-emulator"), settings) as stack:
        yield stack


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def _bash(commands: list[str], cwd: Path) -> str:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(commands)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_start_message_names_what_was_created(stack: EmulatedStack) -> None:
    text = stack.text()
    assert f"AWS emulator {stack.emulator_url} (moto)" in text
    assert f"s3://{aws_emulator.BUCKET}/{aws_emulator.CATALOG_KEY}" in text
    assert "gone" in text and "when the stack stops" in text
    access = httpx.get(f"{stack.user_url}/access_info").json()
    pool_id = access["cognito"]["user_pool_id"]
    assert pool_id and pool_id in text
    assert access["cognito"]["client_id"] in text
    assert re.search(
        r"arn:aws:secretsmanager:us-east-1:\d{12}:secret:labcloud/internal-api-key", text
    )


def test_the_example_session_works_unchanged(stack: EmulatedStack, tmp_path: Path) -> None:
    lines = stack.example_session()
    # Everything up to the job's submission (its JSON body spans several lines), as
    # pasted into a terminal; the download is run once the job is done.
    body_end = next(i for i, line in enumerate(lines) if line.endswith("}}}'"))
    setup = lines[: body_end + 1]
    printed = _bash([*setup, 'echo "TOKEN=$TOKEN"'], tmp_path)
    token = printed.rsplit("TOKEN=", 1)[1].strip()
    claims = _claims(token)
    # A Cognito ID token of the stack's pool, for an account in group users.
    access = httpx.get(f"{stack.user_url}/access_info").json()["cognito"]
    assert claims["iss"].endswith(f"/{access['user_pool_id']}"), claims
    assert claims["token_use"] == "id"
    assert claims["email"] == "me@example.org"
    assert "users" in claims.get("cognito:groups", []), claims

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=stack.user_url, headers=headers, timeout=30) as client:
        jobs = client.get("/jobs").json()
        assert [job["job_name"] for job in jobs] == ["count-1"], jobs

        def finished() -> bool:
            status = client.get(f"/jobs/{jobs[0]['id']}").json()["status"]
            assert status != "error", client.get(f"/jobs/{jobs[0]['id']}").json()
            return bool(status == "finished")

        wait_for(finished, timeout=240, interval=0.5, what="the demo job to finish")
    download = next(line for line in lines if "/download" in line)
    login = [line for line in setup if line.startswith(("API=", "TOKEN=", "AUTH="))]
    result = _bash([*login, download], tmp_path)
    assert result == "fox.txt 4\n"


def test_files_and_results_are_objects_in_the_bucket(stack: EmulatedStack) -> None:
    # The example session's upload and its job's result, as S3 objects.
    s3 = stack.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=aws_emulator.BUCKET, Prefix=f"{aws_emulator.DATA_PREFIX}/"
    )
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    assert any(key.endswith("/data/texts/fox.txt") for key in keys), keys
    result = next(key for key in keys if key.endswith("/output/count-1/wordcount.txt"))
    body = s3.get_object(Bucket=aws_emulator.BUCKET, Key=result)["Body"].read()
    assert body == b"fox.txt 4\n"


def test_presigned_transfers_go_straight_to_s3(stack: EmulatedStack) -> None:
    email, password = "presign@example.org", "presign-pass-1"
    assert (
        httpx.post(
            f"{stack.user_url}/user", data={"username": email, "password": password}
        ).status_code
        == 201
    )
    token = httpx.post(f"{stack.user_url}/token", data={"username": email, "password": password})
    assert token.status_code == 201, token.text
    headers = {"Authorization": f"Bearer {token.json()['id_token']}"}
    with httpx.Client(base_url=stack.user_url, headers=headers, timeout=30) as client:
        upload = client.post("/files/data/inbox/url")
        assert upload.status_code == 201, upload.text
        request = upload.json()
        assert request["url"].startswith(stack.emulator_url), request
        sent = httpx.request(
            request["method"],
            request["url"],
            data=request["data"],
            files={"file": ("note.txt", b"sent to S3 directly")},
        )
        assert sent.is_success, sent.text
        listed = client.get("/files/data/inbox").json()
        assert [entry["path"] for entry in listed] == ["data/inbox/note.txt"], listed

        download = client.get("/files/data/inbox/note.txt/url")
        assert download.status_code == 200, download.text
        request = download.json()
        assert request["url"].startswith(stack.emulator_url), request
        fetched = httpx.request(request["method"], request["url"], headers=request["headers"])
        assert fetched.content == b"sent to S3 directly"


def test_accounts_live_in_the_pool(stack: EmulatedStack) -> None:
    access = httpx.get(f"{stack.user_url}/access_info").json()["cognito"]
    idp = stack.client("cognito-idp")

    def groups(email: str) -> set[str]:
        answer = idp.admin_list_groups_for_user(UserPoolId=access["user_pool_id"], Username=email)
        return {group["GroupName"] for group in answer["Groups"]}

    assert {"users", "admins"} <= groups("admin@labcloud.example.org")
    # The runner's account, in group workers; its settings file points boto3 at the
    # emulator, which its Cognito login uses. The worker API names the pool (where a
    # runner learns to log in there) and accepts only the pool's tokens: the
    # finished job shows the runner's login worked.
    worker_api = read_env_file(stack.data_dir / "runners" / "runner-1.env")["API_URL"]
    worker_access = httpx.get(f"{worker_api}/access_info").json()
    assert worker_access["cognito"]["user_pool_id"] == access["user_pool_id"]
    runner = read_env_file(stack.data_dir / "runners" / "runner-1.env")
    assert groups(runner["USERNAME"]) == {"workers"}
    assert runner["AWS_ENDPOINT_URL"] == stack.emulator_url
    assert "me@example.org" in {
        attribute["Value"]
        for user in idp.list_users(UserPoolId=access["user_pool_id"])["Users"]
        for attribute in user["Attributes"]
        if attribute["Name"] == "email"
    }


def test_the_env_file_reaches_the_services(stack: EmulatedStack) -> None:
    answer = httpx.options(
        f"{stack.user_url}/jobs",
        headers={"Origin": FRONTEND, "Access-Control-Request-Method": "GET"},
    )
    assert answer.headers.get("access-control-allow-origin") == FRONTEND


def test_stopping_the_stack_stops_the_emulator(stack: EmulatedStack) -> None:
    # Last in the module: it ends the stack.
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(timeout=120) == 0
    assert "aws-emulator stopped" in stack.text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stack.emulator_url}/moto-api/", timeout=5)
