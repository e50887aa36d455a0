"""The service images and the compose file, as an operator uses them: the images
build offline (on the base scripts/build-base-image.sh makes from Debian's archive,
with the locked wheels), `docker-compose up` starts PostgreSQL, both APIs and a
runner in containers of them, and the README's example session runs the demo job
through them, its container started by the runner on the host's engine.

The base image is kept between runs (it takes most of a cold build); every other
layer comes from the engine's build cache when the sources did not change."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import free_port
from tests.waiting import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.e2e, pytest.mark.timeout(1200)]

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO_ROOT / "deploy" / "compose"
# Tags of their own, so that the test never replaces images an operator runs.
SERVICE_IMAGE = "labcloud/service:test"
POSTGRES_IMAGE = "labcloud/postgres:test"
SERVICES = ("postgres", "user-api", "worker-api", "runner")


def _require(command: str) -> None:
    if shutil.which(command) is None:
        pytest.fail(f"{command} is missing: run scripts/ensure-deps.sh --postgres")


@dataclass
class ComposeStack:
    project: str
    env_file: Path
    url: str

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "-p", self.project, "--env-file", str(self.env_file), *args],
            cwd=COMPOSE_DIR,
            capture_output=True,
            text=True,
            check=check,
            timeout=600,
        )

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def inspect(self, service: str) -> dict[str, object]:
        out = subprocess.run(
            ["docker", "inspect", self.container(service)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        details: dict[str, object] = json.loads(out)[0]
        return details

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail=60", check=False).stdout


@pytest.fixture(scope="module")
def built_images() -> float:
    """Build the images offline; return the seconds it took."""
    _require("mmdebstrap")
    _require("docker-compose")
    started = time.monotonic()
    subprocess.run(
        [str(REPO_ROOT / "images" / "service" / "build.sh"), "--offline"],
        env={
            **os.environ,
            "SERVICE_IMAGE": SERVICE_IMAGE,
            "POSTGRES_IMAGE": POSTGRES_IMAGE,
        },
        check=True,
        timeout=900,
    )
    seconds = time.monotonic() - started
    print(f"images built in {seconds:.1f} s")
    return seconds


@pytest.fixture(scope="module")
def stack(built_images: float, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    root = tmp_path_factory.mktemp("compose")
    user_port, worker_port = free_port(), free_port()
    env_file = root / "labcloud.env"
    settings = {
        "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "INTERNAL_API_KEY_SECRET": secrets.token_urlsafe(24),
        "BOOTSTRAP_ADMIN_EMAIL": "admin@example.org",
        "BOOTSTRAP_ADMIN_PASSWORD": secrets.token_urlsafe(16),
        "ALLOW_SELF_SIGNUP": "true",
        "LABCLOUD_IMAGE": SERVICE_IMAGE,
        "LABCLOUD_POSTGRES_IMAGE": POSTGRES_IMAGE,
        "LABCLOUD_ENV_FILE": str(env_file),
        "LABCLOUD_USER_PORT": str(user_port),
        "LABCLOUD_WORKER_PORT": str(worker_port),
        "LABCLOUD_PUBLIC_URL": f"http://127.0.0.1:{user_port}",
        "LABCLOUD_JOBS_DIR": str(root / "jobs"),
        # Each runner's account names its containers: unique per test run.
        "LABCLOUD_RUNNER_NAME": f"runner-{secrets.token_hex(4)}",
        "LABCLOUD_HEALTH_INTERVAL": "2s",
    }
    env_file.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    stack = ComposeStack(
        project=f"labcloudtest{secrets.token_hex(4)}",
        env_file=env_file,
        url=f"http://127.0.0.1:{user_port}",
    )
    try:
        # --no-build: the images are the ones just built offline, never a rebuild
        # from the public bases.
        stack.compose("up", "-d", "--no-build")
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False)


def _healthy(stack: ComposeStack, service: str) -> bool:
    state = stack.inspect(service)["State"]
    assert isinstance(state, dict)
    return bool(state.get("Health", {}).get("Status") == "healthy")


def test_services_run_unprivileged_and_report_healthy(stack: ComposeStack) -> None:
    for service in SERVICES:
        wait_for(
            partial(_healthy, stack, service),
            timeout=120,
            interval=0.5,
            what=f"{service} to be healthy",
        )
    for service in ("user-api", "worker-api"):
        config = stack.inspect(service)["Config"]
        assert isinstance(config, dict)
        assert config["User"] == "10001:10001"
    host_config = stack.inspect("runner")["HostConfig"]
    assert isinstance(host_config, dict)
    assert host_config["CapDrop"] == ["ALL"]
    # The one-shot setup made the runner's account and ended.
    assert "created" in stack.compose("logs", "--no-color", "runner-setup").stdout


def _signed_up_client(stack: ComposeStack) -> httpx.Client:
    """A client logged in as a new self-signed-up user."""
    client = httpx.Client(base_url=stack.url, timeout=30)
    email, password = f"me-{secrets.token_hex(4)}@example.org", "demo-pass-1"
    created = client.post("/user", data={"username": email, "password": password})
    assert created.status_code == 201, created.text
    token = client.post("/token", data={"username": email, "password": password})
    client.headers["Authorization"] = f"Bearer {token.json()['id_token']}"
    return client


def _count_words(client: httpx.Client, name: str) -> None:
    """Upload fox.txt, run the demo job ``name`` on it, check its output."""
    uploaded = client.post(
        "/files/data/texts/upload", files={"file": ("fox.txt", b"the quick brown fox\n")}
    )
    assert uploaded.status_code in (200, 201), uploaded.text
    job = client.post(
        "/jobs",
        json={
            "job_name": name,
            "application": {"application": "demo", "version": "latest", "entrypoint": "wordcount"},
            "attributes": {"files_down": {"data_ids": ["texts"]}},
        },
    )
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]

    def ended() -> dict[str, object] | None:
        current: dict[str, object] = client.get(f"/jobs/{job_id}").json()
        return current if current["status"] in ("finished", "error", "canceled") else None

    final = wait_for(ended, timeout=120, interval=0.5, what=f"job {name} to end")
    assert final["status"] == "finished", final
    result = client.get(f"/files/output/{name}/wordcount.txt/download")
    assert result.status_code == 200, result.text
    assert result.text == "fox.txt 4\n"
    archive = client.get(f"/files/output/{name}/download")
    assert archive.status_code == 200
    with zipfile.ZipFile(io.BytesIO(archive.content)) as folder:
        assert folder.read("wordcount.txt") == b"fox.txt 4\n"


def test_readme_session_runs_the_demo_job_through_the_containers(stack: ComposeStack) -> None:
    with closing(_signed_up_client(stack)) as client:
        _count_words(client, "count-1")


def test_recreated_containers_keep_accounts_tokens_files_and_the_runner(
    stack: ComposeStack,
) -> None:
    """What lives in volumes survives new containers (an upgrade): the signing key
    (tokens stay valid), the databases, user files, and the runner's account, which
    the setup does not create again."""
    with closing(_signed_up_client(stack)) as client:
        _count_words(client, "before")
        stack.compose("up", "-d", "--no-build", "--force-recreate")
        wait_for(
            partial(_healthy, stack, "runner"), timeout=120, interval=0.5, what="runner healthy"
        )
        listing = client.get("/files/output/before")
        assert listing.status_code == 200, listing.text
        assert "output/before/wordcount.txt" in listing.text
        assert stack.compose("logs", "--no-color", "runner-setup").stdout.count("created") == 0
        _count_words(client, "after")
