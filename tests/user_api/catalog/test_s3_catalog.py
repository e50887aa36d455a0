"""The catalog kept on S3 (``APPLICATION_CONFIG_FILE=s3://bucket/key``), against moto's
server: loaded at start, a new upload picked up through its ETag, a broken upload kept
out and reported, a bucket that cannot be read stopping the start."""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable, Iterator

import anyio
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tests.aws import MotoServer
from tests.user_api.catalog.test_store import (
    INVALID,
    ONE_VERSION,
    TWO_VERSIONS,
    versions,
    watching,
)
from tests.user_api.conftest import TEST_CATALOG
from tests.user_api.helpers import login, signup
from tests.waiting import wait_for
from user_api.app import create_app
from user_api.catalog.loader import CatalogError
from user_api.catalog.sources import S3CatalogObject, catalog_source
from user_api.catalog.store import CatalogStore
from user_api.settings import UserApiSettings

BUCKET = "labcloud-config"
KEY = "catalogs/application_config.yaml"
LOCATION = f"s3://{BUCKET}/{KEY}"
# Polls every 50 ms so a change is seen at once; a real deployment polls every 30 s.
POLL_S = 0.05
WAIT_S = 30


@pytest.fixture
def bucket(aws: MotoServer) -> MotoServer:
    aws.client("s3").create_bucket(Bucket=BUCKET)
    upload(aws, ONE_VERSION)
    return aws


def upload(aws: MotoServer, text: str) -> None:
    aws.client("s3").put_object(Bucket=BUCKET, Key=KEY, Body=text.encode())


async def until(condition: Callable[[], object]) -> None:
    """Wait for ``condition``, polled: the watcher swaps the catalog in a thread."""
    with anyio.fail_after(WAIT_S):
        while True:
            if condition():
                return
            await anyio.sleep(0.02)


def test_loaded_at_start(bucket: MotoServer) -> None:
    store = CatalogStore(catalog_source(LOCATION, poll_seconds=POLL_S))
    assert versions(store) == ["latest"]
    assert store.status.path == LOCATION
    assert store.status.version == 1
    assert store.status.last_error is None


@pytest.mark.anyio
async def test_changes_are_picked_up_and_a_broken_upload_kept_out(bucket: MotoServer) -> None:
    store = CatalogStore(S3CatalogObject(BUCKET, KEY, poll_seconds=POLL_S))
    async with watching(store):
        await anyio.to_thread.run_sync(upload, bucket, TWO_VERSIONS)
        await until(lambda: store.status.version == 2)
        assert versions(store) == ["latest", "2.0"]

        await anyio.to_thread.run_sync(upload, bucket, INVALID)
        await until(lambda: store.status.last_error is not None)
        assert versions(store) == ["latest", "2.0"]
        assert store.status.version == 2
        error = store.status.last_error
        assert error is not None
        assert error.startswith(f"{LOCATION}, line 6: demo/latest/wc/aws_resources/timeout")

        await anyio.to_thread.run_sync(upload, bucket, ONE_VERSION)
        await until(lambda: store.status.version == 3)
        assert versions(store) == ["latest"]
        assert store.status.last_error is None


@pytest.mark.anyio
async def test_an_unchanged_etag_is_not_read_again(bucket: MotoServer) -> None:
    store = CatalogStore(S3CatalogObject(BUCKET, KEY, poll_seconds=POLL_S))
    reads: list[bool] = []
    original_reload = store.reload

    def counting_reload() -> bool:
        reads.append(True)
        return original_reload()

    store.reload = counting_reload  # type: ignore[method-assign]
    async with watching(store):
        # The watch's first reload, then 20 polls of an object that does not change.
        await until(lambda: reads)
        await anyio.sleep(20 * POLL_S)
        assert len(reads) == 1
        await anyio.to_thread.run_sync(upload, bucket, TWO_VERSIONS)
        await until(lambda: store.status.version == 2)
    assert len(reads) == 2


def test_a_missing_bucket_or_object_refuses_to_start(aws: MotoServer) -> None:
    with pytest.raises(
        CatalogError, match=rf"^{LOCATION}: cannot read the catalog \(NoSuchBucket\)"
    ):
        CatalogStore(catalog_source(LOCATION))
    aws.client("s3").create_bucket(Bucket=BUCKET)
    with pytest.raises(CatalogError, match=r"cannot read the catalog \(NoSuchKey\)"):
        CatalogStore(catalog_source(LOCATION))


def test_an_unreachable_s3_refuses_to_start(
    aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(
        CatalogError, match=rf"^{LOCATION}: cannot read the catalog \(EndpointConnectionError\)"
    ):
        CatalogStore(catalog_source(LOCATION))


@pytest.mark.parametrize("location", ["s3://", "s3://bucket-only", "s3://bucket/folder/"])
def test_an_s3_location_needs_bucket_and_key(user_settings: UserApiSettings, location: str) -> None:
    with pytest.raises(ValidationError, match="s3://BUCKET/KEY"):
        UserApiSettings.model_validate(
            {**user_settings.model_dump(), "application_config_file": location}
        )


@pytest.fixture
def s3_client(bucket: MotoServer, user_settings: UserApiSettings) -> Iterator[TestClient]:
    upload(bucket, TEST_CATALOG.read_text(encoding="utf-8"))
    settings = user_settings.model_copy(
        update={"application_config_file": LOCATION, "application_config_poll_seconds": POLL_S}
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_a_running_server_follows_its_catalog_on_s3(
    s3_client: TestClient, bucket: MotoServer
) -> None:
    user = signup(s3_client, "ada@example.org")
    admin = login(s3_client, "admin@example.org")
    good = TEST_CATALOG.read_text(encoding="utf-8")

    def served_versions() -> set[str]:
        response = s3_client.get("/jobs/applications", headers=user)
        assert response.status_code == 200, response.text
        return set(response.json()["demo"])

    def catalog_status() -> dict[str, object]:
        response = s3_client.get("/admin/catalog", headers=admin)
        assert response.status_code == 200, response.text
        status: dict[str, object] = response.json()
        return status

    assert served_versions() == {"latest"}
    assert catalog_status()["path"] == LOCATION

    # A broken upload: the last good catalog stays, the error is reported to admins.
    upload(bucket, good.replace("timeout: 600", "timeout: -5"))
    status = wait_for(lambda: (s := catalog_status())["last_error"] and s)
    assert str(status["last_error"]).startswith(f"{LOCATION}, line ")
    assert "timeout" in str(status["last_error"])
    assert served_versions() == {"latest"}

    # A fixed upload with a new version is served without a restart.
    catalog = yaml.safe_load(good)
    catalog["demo"]["2.0"] = copy.deepcopy(catalog["demo"]["latest"])
    upload(bucket, yaml.safe_dump(catalog))
    wait_for(lambda: served_versions() == {"latest", "2.0"})
    assert catalog_status()["last_error"] is None
