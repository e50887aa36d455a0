"""Where the catalog's text comes from: a local file, or an object on S3.

A source reads the catalog's text and says when it may have changed; ``CatalogStore``
does the rest (validation, the last good version, the status admins see), the same
for every source.

- ``LocalCatalogFile`` follows the file with change notifications (``watchfiles``).
- ``S3CatalogObject`` (``APPLICATION_CONFIG_FILE=s3://bucket/key``) asks S3 for the
  object's ETag every ``APPLICATION_CONFIG_POLL_SECONDS`` and reports a change when it
  differs from the ETag of the text last read. boto3 finds credentials, region and
  ``AWS_ENDPOINT_URL`` (emulators) the usual way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread
from watchfiles import Change, awatch

from labcloud.secrets import aws_error_reason
from user_api.catalog.loader import CatalogError, read_catalog_text

S3_SCHEME = "s3://"

# A catalog that cannot be read must stop the start within seconds, and a poll must
# not hang for botocore's default minute-long connection attempts.
_CONNECT_TIMEOUT_SECONDS = 5
_READ_TIMEOUT_SECONDS = 10
_MAX_ATTEMPTS = 3

StopEvent = anyio.Event | asyncio.Event


class CatalogSource(Protocol):
    """The catalog's text and its changes."""

    @property
    def location(self) -> str:
        """What messages and the status name: a path or an ``s3://`` URL."""
        ...

    def read(self) -> str:
        """The catalog's current text, or ``CatalogError`` saying why it cannot be read.
        Blocking: call it from a thread when on the event loop."""
        ...

    def changes(self, stop_event: StopEvent | None) -> AsyncIterator[None]:
        """Yields each time the catalog may have changed, until ``stop_event`` is set."""
        ...


def parse_s3_location(location: str) -> tuple[str, str] | None:
    """``(bucket, key)`` of an ``s3://bucket/key`` location, ``None`` for a local path,
    or ``ValueError`` for an ``s3://`` URL without a bucket or a key."""
    if not location.startswith(S3_SCHEME):
        return None
    bucket, _, key = location.removeprefix(S3_SCHEME).partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError("an S3 catalog is written s3://BUCKET/KEY")
    return bucket, key


def catalog_source(location: str | Path, *, poll_seconds: float = 30.0) -> CatalogSource:
    """The source ``APPLICATION_CONFIG_FILE`` names."""
    s3_object = parse_s3_location(str(location)) if isinstance(location, str) else None
    if s3_object is not None:
        bucket, key = s3_object
        return S3CatalogObject(bucket, key, poll_seconds=poll_seconds)
    return LocalCatalogFile(Path(location))


class LocalCatalogFile:
    """A catalog file on a local (or mounted) file system.

    Watcher timings are arguments so tests can react in milliseconds. ``force_polling``
    is for file systems without change notifications (network mounts); polling
    compares modification times, so a second edit within the same second may be missed.
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
        # A symlinked file (a Kubernetes ConfigMap, for one) changes when a link
        # elsewhere in its folder is swapped, with no event on its own name; every
        # change in the folder then counts, and the store ignores those that leave
        # the content as it was.
        self._any_change_in_folder = path.is_symlink()

    @property
    def location(self) -> str:
        return str(self._path)

    def read(self) -> str:
        return read_catalog_text(self._path)

    async def changes(self, stop_event: StopEvent | None) -> AsyncIterator[None]:
        # The parent folder is watched rather than the file: editors and deployment
        # tools replace a file by renaming a new one over it, which a watch on the old
        # file would not see.
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
            yield

    def _concerns_catalog(self, _change: Change, changed: str) -> bool:
        return self._any_change_in_folder or Path(changed).name == self._path.name


class S3CatalogObject:
    """A catalog kept as one S3 object, polled for a new ETag."""

    def __init__(self, bucket: str, key: str, *, poll_seconds: float = 30.0) -> None:
        import boto3  # imported lazily: only deployments with an S3 catalog need it
        from botocore.config import Config

        self._bucket = bucket
        self._key = key
        self._poll_seconds = poll_seconds
        self._client: Any = boto3.client(
            "s3",
            config=Config(
                connect_timeout=_CONNECT_TIMEOUT_SECONDS,
                read_timeout=_READ_TIMEOUT_SECONDS,
                retries={"total_max_attempts": _MAX_ATTEMPTS, "mode": "standard"},
            ),
        )
        # ETag of the text last read, valid or not: a broken object is reported once,
        # not again at every poll, and the next upload is a change again.
        self._etag: str | None = None

    @property
    def location(self) -> str:
        return f"{S3_SCHEME}{self._bucket}/{self._key}"

    def read(self) -> str:
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=self._key)
            body = response["Body"].read()
        except Exception as exc:  # botocore raises a family of untyped errors
            raise CatalogError(
                f"{self.location}: cannot read the catalog ({aws_error_reason(exc)})"
            ) from None
        self._etag = response.get("ETag")
        try:
            return bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CatalogError(f"{self.location}: cannot read the catalog: {exc}") from None

    async def changes(self, stop_event: StopEvent | None) -> AsyncIterator[None]:
        while True:
            if stop_event is None:
                await anyio.sleep(self._poll_seconds)
            else:
                with anyio.move_on_after(self._poll_seconds):
                    await stop_event.wait()
                if stop_event.is_set():
                    return
            etag = await anyio.to_thread.run_sync(self._current_etag)
            # An object that cannot be asked about is a change too: the read that
            # follows fails and reports why, where admins look.
            if etag is None or etag != self._etag:
                yield

    def _current_etag(self) -> str | None:
        try:
            response = self._client.head_object(Bucket=self._bucket, Key=self._key)
        except Exception:  # reported by the read that follows
            return None
        etag = response.get("ETag")
        return etag if isinstance(etag, str) else None
