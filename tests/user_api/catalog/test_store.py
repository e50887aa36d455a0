"""The in-memory catalog: reloads that keep the last good catalog, and the file watcher."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from user_api.catalog.loader import CatalogError
from user_api.catalog.sources import LocalCatalogFile
from user_api.catalog.store import CatalogStore

ONE_VERSION = """\
demo:
  latest:
    wc:
      app: {cmd: [/app/wordcount.sh]}
      handler: {image_url: "labcloud/demo:latest", files_up: {output: output}}
      aws_resources: {timeout: 600}
"""
TWO_VERSIONS = (
    ONE_VERSION
    + """\
  "2.0":
    wc:
      app: {cmd: [/app/wordcount.sh]}
      handler: {image_url: "labcloud/demo:2.0"}
"""
)
INVALID = ONE_VERSION.replace("timeout: 600", "timeout: 0")

# Short timings keep the watcher tests fast. Native notifications, not polling: the
# polling watcher compares modification times, which misses a second write within
# the same second.
WAIT_S = 10


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    path = tmp_path / "application_config.yaml"
    path.write_text(ONE_VERSION, encoding="utf-8")
    return path


def fast_store(path: Path) -> CatalogStore:
    return CatalogStore(LocalCatalogFile(path, debounce_ms=20, step_ms=10))


def versions(store: CatalogStore) -> list[str]:
    return list(store.current.root["demo"])


def test_initial_load(catalog_file: Path) -> None:
    store = CatalogStore(LocalCatalogFile(catalog_file))
    assert versions(store) == ["latest"]
    assert store.status.path == str(catalog_file)
    assert store.status.version == 1
    assert store.status.last_error is None
    assert store.status.loaded_at.tzinfo is not None


def test_an_invalid_file_refuses_to_start(catalog_file: Path) -> None:
    catalog_file.write_text(INVALID, encoding="utf-8")
    with pytest.raises(CatalogError, match=r"line 6: demo/latest/wc/aws_resources/timeout"):
        CatalogStore(LocalCatalogFile(catalog_file))


def test_a_missing_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        CatalogStore(LocalCatalogFile(tmp_path / "absent.yaml"))


def test_reload_swaps_only_valid_files(
    catalog_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CatalogStore(LocalCatalogFile(catalog_file))

    catalog_file.write_text(TWO_VERSIONS, encoding="utf-8")
    assert store.reload() is True
    assert versions(store) == ["latest", "2.0"]
    assert store.status.version == 2

    good = store.current
    catalog_file.write_text(INVALID, encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="user_api.catalog.store"):
        assert store.reload() is False
    assert store.current is good
    assert store.status.version == 2
    assert store.status.last_error is not None
    assert "line 6: demo/latest/wc/aws_resources/timeout" in store.status.last_error
    assert store.status.last_error_at is not None
    assert "line 6" in caplog.text

    catalog_file.write_text(ONE_VERSION, encoding="utf-8")
    assert store.reload() is True
    assert versions(store) == ["latest"]
    assert store.status.version == 3
    assert store.status.last_error is None
    assert store.status.last_error_at is None


def test_reload_of_an_unchanged_file_keeps_the_version(catalog_file: Path) -> None:
    store = CatalogStore(LocalCatalogFile(catalog_file))
    catalog = store.current
    assert store.reload() is True
    assert store.current is catalog
    assert store.status.version == 1


def test_a_deleted_file_keeps_the_last_catalog(catalog_file: Path) -> None:
    store = CatalogStore(LocalCatalogFile(catalog_file))
    catalog_file.unlink()
    assert store.reload() is False
    assert versions(store) == ["latest"]
    assert store.status.last_error is not None
    assert "cannot read" in store.status.last_error


def test_public_view_is_built_once_per_catalog(catalog_file: Path) -> None:
    store = CatalogStore(LocalCatalogFile(catalog_file))
    assert store.current.public_view() is store.current.public_view()


@asynccontextmanager
async def watching(store: CatalogStore) -> AsyncIterator[None]:
    stop = anyio.Event()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(store.watch, stop)
        try:
            yield
        finally:
            stop.set()


async def write_until(path: Path, text: str, done: Callable[[], bool]) -> None:
    """Write ``text`` until the watcher has acted on it: the watcher may still be
    starting when the first write lands, so each write is repeated (a rewrite of the
    same content is not a new version)."""
    with anyio.fail_after(WAIT_S):
        while True:
            await anyio.Path(path).write_text(text, encoding="utf-8")
            for _ in range(10):
                if done():
                    return
                await anyio.sleep(0.03)


@pytest.mark.anyio
async def test_watcher_follows_edits(catalog_file: Path) -> None:
    store = fast_store(catalog_file)
    async with watching(store):
        await write_until(catalog_file, TWO_VERSIONS, lambda: store.status.version == 2)
        assert versions(store) == ["latest", "2.0"]

        await write_until(catalog_file, INVALID, lambda: store.status.last_error is not None)
        assert versions(store) == ["latest", "2.0"]
        assert store.status.version == 2
        assert store.status.last_error is not None
        assert "line 6" in store.status.last_error

        await write_until(catalog_file, ONE_VERSION, lambda: store.status.version == 3)
        assert versions(store) == ["latest"]
        assert store.status.last_error is None


@pytest.mark.anyio
async def test_watcher_sees_a_file_replaced_by_rename(catalog_file: Path) -> None:
    store = fast_store(catalog_file)
    replacement = catalog_file.with_name(".application_config.yaml.new")

    def replace(text: str) -> None:
        replacement.write_text(text, encoding="utf-8")
        os.replace(replacement, catalog_file)

    async with watching(store):
        with anyio.fail_after(WAIT_S):
            while store.status.version != 2:
                await anyio.to_thread.run_sync(replace, TWO_VERSIONS)
                await anyio.sleep(0.2)
    assert versions(store) == ["latest", "2.0"]


@pytest.mark.anyio
async def test_watcher_ignores_other_files_in_the_folder(catalog_file: Path) -> None:
    store = fast_store(catalog_file)
    calls: list[bool] = []
    original_reload = store.reload

    def counting_reload() -> bool:
        calls.append(True)
        return original_reload()

    store.reload = counting_reload  # type: ignore[method-assign]
    async with watching(store):
        # Rewriting the catalog itself (same text) proves the watcher is running.
        await write_until(catalog_file, ONE_VERSION, lambda: len(calls) >= 2)
        await anyio.sleep(0.1)
        seen = len(calls)
        for index in range(5):
            await anyio.Path(catalog_file.with_name(f"other-{index}.txt")).write_text("x")
            await anyio.sleep(0.05)
        await anyio.sleep(0.2)
        assert len(calls) == seen
    assert store.status.version == 1


@pytest.mark.anyio
async def test_watcher_follows_a_swapped_symlink(tmp_path: Path) -> None:
    # The layout a Kubernetes ConfigMap volume uses: the file is a link through
    # "..data", and an update swaps "..data" to a new folder.
    first = tmp_path / "..v1"
    first.mkdir()
    (first / "application_config.yaml").write_text(ONE_VERSION, encoding="utf-8")
    (tmp_path / "..data").symlink_to("..v1")
    catalog_file = tmp_path / "application_config.yaml"
    catalog_file.symlink_to("..data/application_config.yaml")
    store = fast_store(catalog_file)

    second = tmp_path / "..v2"
    second.mkdir()
    (second / "application_config.yaml").write_text(TWO_VERSIONS, encoding="utf-8")

    def swap(target: str) -> None:
        link = tmp_path / "..data_tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        os.replace(link, tmp_path / "..data")

    async with watching(store):
        with anyio.fail_after(WAIT_S):
            while store.status.version != 2:
                await anyio.to_thread.run_sync(swap, "..v2")
                await anyio.sleep(0.2)
    assert versions(store) == ["latest", "2.0"]


@pytest.mark.anyio
async def test_watch_returns_when_stopped(catalog_file: Path) -> None:
    store = fast_store(catalog_file)
    stop = anyio.Event()
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(store.watch, stop)
            await anyio.sleep(0.1)
            stop.set()
