"""The catalog in memory, hot reloaded when its file changes.

Requests read ``CatalogStore.current``, an immutable ``Catalog`` held in memory, so
serving them costs no file system call. ``watch`` follows the file and swaps in a
new catalog only when the whole file validates; an invalid edit keeps the last good
catalog, is logged, and is kept in ``status`` for admins.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict
from watchfiles import Change, awatch

from user_api.catalog.loader import CatalogError, parse_catalog, read_catalog_text
from user_api.catalog.schemas import Catalog

logger = logging.getLogger(__name__)


class CatalogStatus(BaseModel):
    """Which catalog is in use and the last problem met while reloading it."""

    model_config = ConfigDict(frozen=True)

    path: Path
    loaded_at: datetime
    version: int
    last_error: str | None = None
    last_error_at: datetime | None = None


class CatalogStore:
    """Holds the current catalog and reloads it from ``path``.

    The constructor loads the file once and raises ``CatalogError`` when it is
    invalid: the service must not start with a broken catalog. Watcher timings are
    arguments so tests can react in milliseconds. ``force_polling`` is for file
    systems without change notifications (network mounts); polling compares
    modification times, so a second edit within the same second may be missed.
    """

    def __init__(
        self,
        path: Path,
        *,
        debounce_ms: int = 500,
        step_ms: int = 50,
        force_polling: bool = False,
        poll_delay_ms: int = 300,
    ) -> None:
        self._path = path.absolute()
        self._debounce_ms = debounce_ms
        self._step_ms = step_ms
        self._force_polling = force_polling
        self._poll_delay_ms = poll_delay_ms
        # reload() runs in worker threads; the lock keeps catalog, text and status
        # consistent with each other when two reloads overlap.
        self._lock = threading.Lock()
        # A symlinked file (a Kubernetes ConfigMap, for one) changes when a link
        # elsewhere in its folder is swapped, with no event on its own name; every
        # change in the folder then triggers a reload, and reload() ignores those
        # that leave the content as it was.
        self._any_change_in_folder = path.is_symlink()
        self._text = read_catalog_text(self._path)
        self._catalog = parse_catalog(self._text, str(self._path))
        self._status = CatalogStatus(path=self._path, loaded_at=_now(), version=1)
        logger.info("application catalog loaded from %s", self._path)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def current(self) -> Catalog:
        """The last catalog that validated."""
        return self._catalog

    @property
    def status(self) -> CatalogStatus:
        return self._status

    def reload(self) -> bool:
        """Read and validate the file; swap it in when valid.

        Returns ``True`` when the file is valid (and is now the current catalog),
        ``False`` when it was refused and the previous catalog stays. Blocking: call
        it from a thread when on the event loop.
        """
        try:
            text = read_catalog_text(self._path)
            catalog = parse_catalog(text, str(self._path))
        except CatalogError as exc:
            with self._lock:
                self._status = self._status.model_copy(
                    update={"last_error": exc.message, "last_error_at": _now()}
                )
                version = self._status.version
            logger.error(
                "application catalog %s refused, keeping version %d:\n%s",
                self._path,
                version,
                exc.message,
            )
            return False
        with self._lock:
            if text == self._text:
                # Watchers report touches and unrelated writes too; an unchanged
                # file is not a new version, but it does clear a past error.
                self._status = self._status.model_copy(
                    update={"last_error": None, "last_error_at": None}
                )
                return True
            self._text = text
            self._catalog = catalog
            self._status = CatalogStatus(
                path=self._path, loaded_at=_now(), version=self._status.version + 1
            )
            version = self._status.version
        logger.info("application catalog %s reloaded (version %d)", self._path, version)
        return True

    async def watch(self, stop_event: anyio.Event | asyncio.Event | None = None) -> None:
        """Reload the catalog whenever its file changes, until ``stop_event`` is set.

        The parent folder is watched rather than the file: editors and deployment
        tools replace a file by renaming a new one over it, which a watch on the
        old file would not see.
        """
        # An edit made between the constructor's load and the start of the watch
        # would otherwise go unnoticed until the next one.
        await anyio.to_thread.run_sync(self.reload)
        try:
            async for _changes in awatch(
                self._path.parent,
                watch_filter=self._concerns_catalog,
                debounce=self._debounce_ms,
                step=self._step_ms,
                stop_event=stop_event,
                recursive=False,
                force_polling=self._force_polling,
                poll_delay_ms=self._poll_delay_ms,
            ):
                await anyio.to_thread.run_sync(self.reload)
        except Exception:
            # The watcher usually runs as a background task whose failure nobody
            # awaits; say that edits are no longer followed.
            logger.exception("watching %s failed; catalog edits are no longer applied", self._path)
            raise

    def _concerns_catalog(self, _change: Change, changed: str) -> bool:
        return self._any_change_in_folder or Path(changed).name == self._path.name


def _now() -> datetime:
    return datetime.now(UTC)
