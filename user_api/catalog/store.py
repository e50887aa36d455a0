"""The catalog in memory, hot reloaded when its source changes.

Requests read ``CatalogStore.current``, an immutable ``Catalog`` held in memory, so
serving them costs no file system or network call. ``watch`` follows the source (a
local file or an S3 object, see ``user_api.catalog.sources``) and swaps in a new
catalog only when the whole text validates; an invalid edit keeps the last good
catalog, is logged, and is kept in ``status`` for admins.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict

from user_api.catalog.loader import CatalogError, parse_catalog
from user_api.catalog.schemas import Catalog
from user_api.catalog.sources import CatalogSource

logger = logging.getLogger(__name__)


class CatalogStatus(BaseModel):
    """Which catalog is in use and the last problem met while reloading it."""

    model_config = ConfigDict(frozen=True)

    path: str
    """The catalog's location: a file's path or an ``s3://bucket/key`` URL."""
    loaded_at: datetime
    version: int
    last_error: str | None = None
    last_error_at: datetime | None = None


class CatalogStore:
    """Holds the current catalog and reloads it from ``source``.

    The constructor reads the source once and raises ``CatalogError`` when it cannot
    be read or is invalid: the service must not start with a broken catalog.
    """

    def __init__(self, source: CatalogSource) -> None:
        self._source = source
        # reload() runs in worker threads; the lock keeps catalog, text and status
        # consistent with each other when two reloads overlap.
        self._lock = threading.Lock()
        self._text = source.read()
        self._catalog = parse_catalog(self._text, source.location)
        self._status = CatalogStatus(path=source.location, loaded_at=_now(), version=1)
        logger.info("application catalog loaded from %s", source.location)

    @property
    def location(self) -> str:
        return self._source.location

    @property
    def current(self) -> Catalog:
        """The last catalog that validated."""
        return self._catalog

    @property
    def status(self) -> CatalogStatus:
        return self._status

    def reload(self) -> bool:
        """Read and validate the source; swap it in when valid.

        Returns ``True`` when the text is valid (and is now the current catalog),
        ``False`` when it was refused and the previous catalog stays. Blocking: call
        it from a thread when on the event loop.
        """
        try:
            text = self._source.read()
            catalog = parse_catalog(text, self._source.location)
        except CatalogError as exc:
            with self._lock:
                self._status = self._status.model_copy(
                    update={"last_error": exc.message, "last_error_at": _now()}
                )
                version = self._status.version
            logger.error(
                "application catalog %s refused, keeping version %d:\n%s",
                self._source.location,
                version,
                exc.message,
            )
            return False
        with self._lock:
            if text == self._text:
                # Watchers report touches and unrelated writes too; an unchanged
                # text is not a new version, but it does clear a past error.
                self._status = self._status.model_copy(
                    update={"last_error": None, "last_error_at": None}
                )
                return True
            self._text = text
            self._catalog = catalog
            self._status = CatalogStatus(
                path=self._source.location, loaded_at=_now(), version=self._status.version + 1
            )
            version = self._status.version
        logger.info("application catalog %s reloaded (version %d)", self._source.location, version)
        return True

    async def watch(self, stop_event: anyio.Event | asyncio.Event | None = None) -> None:
        """Reload the catalog whenever its source changes, until ``stop_event`` is set."""
        # An edit made between the constructor's load and the start of the watch
        # would otherwise go unnoticed until the next one.
        await anyio.to_thread.run_sync(self.reload)
        try:
            async for _change in self._source.changes(stop_event):
                await anyio.to_thread.run_sync(self.reload)
        except Exception:
            # The watcher usually runs as a background task whose failure nobody
            # awaits; say that edits are no longer followed.
            logger.exception(
                "watching %s failed; catalog edits are no longer applied", self._source.location
            )
            raise


def _now() -> datetime:
    return datetime.now(UTC)
