"""Storage in an S3 bucket (``FILESYSTEM=s3``), or any store that speaks S3.

Keys map to object names under a prefix (``USER_DATA_ROOT_PATH``, normalised: no
leading ``./`` or ``/``; empty for the bucket's top). S3 has no folders: a folder
exists while objects exist under ``<key>/``. ``make_folder`` writes a zero-byte
marker object ``<key>/`` so that an empty folder exists too, and deleting or moving
the last thing out of a folder leaves its marker, so that a folder does not vanish
with its last file (as on local storage).

Bytes stream both ways. ``write`` sends a stream of unknown length as a multipart
upload of ``part_size`` parts (one ``put_object`` when it fits in one part), holding
one part in memory; S3 makes the object visible only when the upload completes, so
readers never see a partial file, and a failed upload is aborted. ``open_read``
returns the response body, read as the caller reads it. Folder renames and deletes
go page by page (1,000 keys, S3's page and batch size); they are not atomic: a
rename that fails midway leaves the objects copied so far under both names.

Transfer requests are presigned by the client's credentials: a GET for a file, a
POST whose policy fixes the key (or, for an upload into a folder, the folder:
``starts-with $key <folder>/``, key ``<folder>/${filename}``), caps the size and
expires. A folder cannot be downloaded through a URL: S3 cannot zip it.

Object names that are not normalised storage keys (written to the bucket by other
tools, or a presigned folder upload that named a file ``a/../b``) are skipped in
listings with a warning, as local storage skips links that leave its root.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import PurePath
from typing import Any, BinaryIO, cast
from urllib.parse import quote

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from labcloud.contract import SignedRequest
from labcloud.errors import BadRequest, Conflict, NotFound, Unavailable
from labcloud.secrets import aws_error_reason
from labcloud.storage.base import CHUNK_SIZE, Entry, EntryType, Storage
from labcloud.storage.paths import UnsafePath, check_key

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
# Parts of a multipart upload: S3 takes 5 MiB at least (but for the last part) and
# 10,000 parts at most. Parts double in size after every 1,000, so the part limit
# is never reached before S3's 5 TiB object limit, while memory holds one part.
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB
PARTS_PER_SIZE = 1000
# S3 copies an object of up to 5 GiB in one request; larger ones are copied by the
# managed (multipart) copy, in parts of this size, server-side.
MAX_SINGLE_COPY = 5 * 1024 * MiB
COPY_PART_SIZE = 64 * MiB
# S3's largest listing page and delete batch.
PAGE_SIZE = 1000
_FOLDER_MARKER_BODY = b""
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
# A service whose storage cannot be reached must say so within seconds at start.
_CONNECT_TIMEOUT_SECONDS = 5
_READ_TIMEOUT_SECONDS = 60
_MAX_ATTEMPTS = 3
# Requests in flight at once: the API serves transfers from its thread pool.
_MAX_POOL_CONNECTIONS = 32
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageUnavailable(Unavailable):
    """The file storage cannot be reached; try again later."""


class BucketUnavailable(ValueError):
    """The configured bucket cannot be used (a ``ValueError``, so that raised from
    a settings validator it is reported as an invalid setting)."""


class FolderUrlUnavailable(BadRequest):
    """A folder cannot be downloaded through a URL on this storage."""


def key_prefix(root: PurePath | str) -> str:
    """The object-name prefix of ``USER_DATA_ROOT_PATH``: its segments without ``.``
    and empty ones, ending with ``/`` ("" for the top of the bucket). Raises
    ``ValueError`` for a ``..`` segment."""
    segments = [segment for segment in str(root).split("/") if segment not in ("", ".")]
    if ".." in segments:
        raise ValueError(f"the S3 key prefix {str(root)!r} contains a '..' segment")
    return "".join(f"{segment}/" for segment in segments)


def s3_client(*, region: str | None = None, endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client (untyped) with short connect timeouts and SigV4 presigning.

    ``endpoint_url`` None: AWS, or ``AWS_ENDPOINT_URL(_S3)`` when set. A store at an
    endpoint of its own is addressed by path (``<endpoint>/<bucket>/<key>``): its
    host name rarely resolves with the bucket in front of it."""
    custom_endpoint = endpoint_url or any(os.environ.get(name) for name in _ENDPOINT_VARIABLES)
    config = Config(
        region_name=region,
        signature_version="s3v4",
        connect_timeout=_CONNECT_TIMEOUT_SECONDS,
        read_timeout=_READ_TIMEOUT_SECONDS,
        retries={"total_max_attempts": _MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=_MAX_POOL_CONNECTIONS,
        s3={"addressing_style": "path"} if custom_endpoint else {},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def check_bucket(client: Any, bucket: str) -> None:
    """Raise ``BucketUnavailable`` naming ``S3_BUCKET`` and AWS's reason when the
    bucket does not exist or cannot be reached with these credentials."""
    try:
        client.head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:
        reason = aws_error_reason(exc)
        reason = {"404": "no such bucket", "403": "access denied"}.get(reason, reason)
        raise BucketUnavailable(f"S3_BUCKET {bucket!r} cannot be used ({reason})") from None


def _attachment(filename: str) -> str:
    """The ``Content-Disposition`` S3 sends with a presigned download: the file's
    name, in RFC 5987 form when it is not plain ASCII (as the API's own downloads)."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


def _is_missing(exc: ClientError) -> bool:
    return aws_error_reason(exc) in _MISSING


def _parent(key: str) -> str:
    return key.rpartition("/")[0]


def _ancestors(key: str) -> Iterator[str]:
    """The folders above ``key``, from the top down."""
    parts = key.split("/")
    for end in range(1, len(parts)):
        yield "/".join(parts[:end])


def _read_part(stream: BinaryIO, size: int) -> bytearray:
    """Up to ``size`` bytes of ``stream``, read ``CHUNK_SIZE`` at a time (a stream
    may return less than asked); short only at the end of the stream. A bytearray,
    which boto3 sends as it is: a copy as bytes would double the memory a part takes."""
    buffer = bytearray()
    while len(buffer) < size:
        chunk = stream.read(min(CHUNK_SIZE, size - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    return buffer


class S3Storage(Storage):
    """Files as objects of one bucket under a key prefix; transfer requests are
    presigned by the client's credentials."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        prefix: str = "",
        part_size: int = DEFAULT_PART_SIZE,
        copy_threshold: int = MAX_SINGLE_COPY,
        copy_part_size: int = COPY_PART_SIZE,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 multipart parts are at least {MIN_PART_SIZE} bytes")
        self._client = client
        self._bucket = bucket
        self._prefix = key_prefix(prefix)
        self._part_size = part_size
        self._copy_threshold = copy_threshold
        self._copy_config = TransferConfig(
            multipart_threshold=copy_threshold, multipart_chunksize=copy_part_size
        )

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        """The object-name prefix of every key ("" or ending with ``/``)."""
        return self._prefix

    # -- names -------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _key(self, name: str) -> str | None:
        """The storage key of the object name ``name``, or None (with a warning) when
        it is not a normalised key."""
        key = name[len(self._prefix) :]
        try:
            return check_key(key)
        except UnsafePath:
            logger.warning("skipping s3://%s/%s: not a valid storage key", self._bucket, name)
            return None

    @contextmanager
    def _failures(self, action: str, key: str) -> Iterator[None]:
        """Turn AWS errors into ``StorageUnavailable`` (503) naming the action and
        AWS's reason."""
        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(
                f"file storage: cannot {action} {key!r} ({aws_error_reason(exc)})"
            ) from exc

    def _pages(self, prefix: str, *, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        """Listing pages of the objects under ``prefix``, in key order."""
        arguments: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix}
        if delimiter is not None:
            arguments["Delimiter"] = delimiter
        paginator = self._client.get_paginator("list_objects_v2")
        with self._failures("list", prefix):
            for page in paginator.paginate(**arguments, PaginationConfig={"PageSize": PAGE_SIZE}):
                yield cast(dict[str, Any], page)

    # -- reading -----------------------------------------------------------------

    def _head(self, key: str) -> Entry | None:
        """The file at ``key``, or None."""
        with self._failures("read", key):
            try:
                response = self._client.head_object(Bucket=self._bucket, Key=self._name(key))
            except ClientError as exc:
                if _is_missing(exc):
                    return None
                raise
        return Entry(key, EntryType.FILE, int(response["ContentLength"]))

    def _folder_exists(self, key: str) -> bool:
        with self._failures("list", key):
            response = self._client.list_objects_v2(
                Bucket=self._bucket, Prefix=self._name(key) + "/", MaxKeys=1
            )
        return bool(response.get("KeyCount", 0))

    def stat(self, key: str) -> Entry | None:
        """The file at ``key``, else the folder (objects exist under ``key/``), else
        None."""
        entry = self._head(key)
        if entry is not None:
            return entry
        if self._folder_exists(key):
            return Entry(key, EntryType.DIRECTORY, 0)
        return None

    def list(self, key: str, *, recursive: bool = False, show_dirs: bool = True) -> list[Entry]:
        """Entries under the folder ``key``, sorted by key; empty when it is not a
        folder. Every page of the listing is read (S3 returns 1,000 keys a page)."""
        prefix = self._name(key) + "/"
        entries: list[Entry] = []
        folders: set[str] = set()
        for page in self._pages(prefix, delimiter=None if recursive else "/"):
            for common in page.get("CommonPrefixes", []):
                folders.add(str(common["Prefix"]).removesuffix("/"))
            for item in page.get("Contents", []):
                name = str(item["Key"])
                relative = name[len(prefix) :]
                if not relative:
                    continue  # the folder's own marker
                if recursive:
                    # The folders on the way to an object exist because it does (a
                    # marker "a/b/" yields "a" and "a/b").
                    parts = relative.split("/")
                    folders.update(prefix + "/".join(parts[:end]) for end in range(1, len(parts)))
                if name.endswith("/"):
                    continue
                child = self._key(name)
                if child is not None:
                    entries.append(Entry(child, EntryType.FILE, int(item["Size"])))
        if show_dirs:
            for folder in folders:
                child = self._key(folder)
                if child is not None:
                    entries.append(Entry(child, EntryType.DIRECTORY, 0))
        return sorted(entries, key=lambda entry: entry.key)

    def iter_files(self, key: str) -> Iterator[Entry]:
        """Every file under the folder ``key``, page by page, in key order (S3 lists
        by UTF-8 bytes, which is the order of the keys as strings); just the file
        when ``key`` is one."""
        prefix = self._name(key) + "/"
        found = False
        for page in self._pages(prefix):
            for item in page.get("Contents", []):
                found = True
                name = str(item["Key"])
                if name.endswith("/"):
                    continue
                child = self._key(name)
                if child is not None:
                    yield Entry(child, EntryType.FILE, int(item["Size"]))
        if not found:
            entry = self._head(key)
            if entry is not None:
                yield entry

    def open_read(self, key: str) -> BinaryIO:
        """The object's body, streamed from S3 as it is read (close it when done)."""
        with self._failures("read", key):
            try:
                response = self._client.get_object(Bucket=self._bucket, Key=self._name(key))
            except ClientError as exc:
                if _is_missing(exc):
                    raise NotFound(f"no file at {key!r}") from None
                raise
        return cast(BinaryIO, response["Body"])

    # -- writing -----------------------------------------------------------------

    def _check_no_file_above(self, key: str) -> None:
        """Refuse ``key`` when a file stands where one of its folders should be."""
        for folder in _ancestors(key):
            if self._head(folder) is not None:
                raise Conflict(f"{folder!r} is a file, not a folder")

    def _keep_folder(self, key: str) -> None:
        """Write the marker of ``key``'s folder, so that it stays when the last
        object under it goes (as a local folder does)."""
        parent = _parent(key)
        if parent:
            self._put_marker(parent)

    def _put_marker(self, folder: str) -> None:
        with self._failures("create the folder", folder):
            self._client.put_object(
                Bucket=self._bucket, Key=self._name(folder) + "/", Body=_FOLDER_MARKER_BODY
            )

    def _part_size_for(self, number: int) -> int:
        return int(self._part_size * 2 ** ((number - 1) // PARTS_PER_SIZE))

    def write(self, key: str, stream: BinaryIO) -> Entry:
        """Store ``stream`` at ``key``: one request when it fits in one part, else a
        multipart upload holding one part in memory, aborted when anything fails.
        A folder at ``key``, or a file where a folder above it should be, is a
        conflict."""
        name = self._name(key)
        if self._folder_exists(key):
            raise Conflict(f"{key!r} is a folder")
        self._check_no_file_above(key)
        part = _read_part(stream, self._part_size)
        if len(part) < self._part_size:
            with self._failures("write", key):
                self._client.put_object(Bucket=self._bucket, Key=name, Body=part)
            return Entry(key, EntryType.FILE, len(part))
        with self._failures("write", key):
            upload_id = self._client.create_multipart_upload(Bucket=self._bucket, Key=name)[
                "UploadId"
            ]
        try:
            size = self._upload_parts(key, name, upload_id, part, stream)
        except BaseException:
            with suppress(BotoCoreError, ClientError):
                self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=name, UploadId=upload_id
                )
            raise
        return Entry(key, EntryType.FILE, size)

    def _upload_parts(
        self, key: str, name: str, upload_id: str, first: bytearray, stream: BinaryIO
    ) -> int:
        parts: list[dict[str, Any]] = []
        size = 0
        number = 1
        part = first
        with self._failures("write", key):
            while part:
                response = self._client.upload_part(
                    Bucket=self._bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=part
                )
                parts.append({"ETag": response["ETag"], "PartNumber": number})
                size += len(part)
                number += 1
                # Let the part sent go before the next one is read: one part in memory.
                part = bytearray()
                part = _read_part(stream, self._part_size_for(number))
            self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        return size

    def make_folder(self, key: str) -> Entry:
        """Write the folder's marker ``<key>/``; idempotent. A file at ``key`` or
        above it is a conflict."""
        if self._head(key) is not None:
            raise Conflict(f"{key!r} is a file, not a folder")
        self._check_no_file_above(key)
        self._put_marker(key)
        return Entry(key, EntryType.DIRECTORY, 0)

    def _copy(self, source_name: str, target_name: str, size: int, key: str) -> None:
        source = {"Bucket": self._bucket, "Key": source_name}
        with self._failures("copy", key):
            if size < self._copy_threshold:
                self._client.copy_object(Bucket=self._bucket, Key=target_name, CopySource=source)
            else:
                self._client.copy(source, self._bucket, target_name, Config=self._copy_config)

    def _delete_names(self, names: Sequence[str], key: str) -> None:
        """Delete up to ``PAGE_SIZE`` objects in one request."""
        if not names:
            return
        with self._failures("delete", key):
            response = self._client.delete_objects(
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": name} for name in names], "Quiet": True},
            )
        errors = response.get("Errors", [])
        if errors:
            raise StorageUnavailable(
                f"file storage: cannot delete {len(errors)} object(s) under {key!r} "
                f"({errors[0].get('Code', 'unknown error')})"
            )

    def move(self, source: str, target: str) -> Entry:
        """Copy ``source`` (a file, or a folder page by page) to ``target``, then
        delete what was copied; an existing ``target`` is a conflict."""
        entry = self.stat(source)
        if entry is None:
            raise NotFound(f"nothing at {source!r}")
        if target == source or target.startswith(source + "/"):
            raise BadRequest(f"cannot move {source!r} into itself")
        if self.stat(target) is not None:
            raise Conflict(f"{target!r} already exists")
        self._check_no_file_above(target)
        source_name, target_name = self._name(source), self._name(target)
        if entry.type is EntryType.FILE:
            self._copy(source_name, target_name, entry.size, source)
            with self._failures("delete", source):
                self._client.delete_object(Bucket=self._bucket, Key=source_name)
        else:
            prefix = source_name + "/"
            for page in self._pages(prefix):
                names = [str(item["Key"]) for item in page.get("Contents", [])]
                for item in page.get("Contents", []):
                    name = str(item["Key"])
                    self._copy(
                        name, target_name + name[len(source_name) :], int(item["Size"]), source
                    )
                self._delete_names(names, source)
        self._keep_folder(source)
        moved = self.stat(target)
        assert moved is not None
        return moved

    def delete(self, key: str) -> None:
        """Delete the file at ``key``, or every object under the folder ``key`` in
        batches of 1,000; nothing there is fine."""
        entry = self.stat(key)
        if entry is None:
            return
        if entry.type is EntryType.FILE:
            with self._failures("delete", key):
                self._client.delete_object(Bucket=self._bucket, Key=self._name(key))
        else:
            for page in self._pages(self._name(key) + "/"):
                self._delete_names([str(item["Key"]) for item in page.get("Contents", [])], key)
        self._keep_folder(key)

    # -- transfer requests -------------------------------------------------------

    def download_request(self, key: str, *, expires_in: int) -> SignedRequest:
        """A presigned GET of the file at ``key``, offered under its name. A folder
        is refused (``FolderUrlUnavailable``): S3 cannot send it as a zip."""
        entry = self.stat(key)
        if entry is None:
            raise NotFound("no such file or folder")
        if entry.type is EntryType.DIRECTORY:
            # Storage keys start with the owner's id: the message names no key.
            raise FolderUrlUnavailable(
                "this is a folder, and a URL downloads one file: download the folder "
                "as a zip through the API's download route (GET /files/{path}/download)"
            )
        with self._failures("sign a download of", key):
            url = self._client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self._bucket,
                    "Key": self._name(key),
                    "ResponseContentDisposition": _attachment(key.rpartition("/")[2]),
                },
                ExpiresIn=expires_in,
            )
        return SignedRequest(method="GET", url=url)

    def _presigned_post(
        self, key: str, name: str, *, expires_in: int, max_bytes: int | None
    ) -> SignedRequest:
        # boto3 adds the key's condition itself: the exact key, or for a key ending
        # in ${filename}, ["starts-with", "$key", <what comes before it>].
        conditions: Sequence[Any] = (
            [] if max_bytes is None else [["content-length-range", 0, max_bytes]]
        )
        with self._failures("sign an upload to", key):
            post = self._client.generate_presigned_post(
                Bucket=self._bucket, Key=name, Conditions=[*conditions], ExpiresIn=expires_in
            )
        return SignedRequest(method="POST", url=post["url"], data=dict(post["fields"]))

    def upload_request(self, key: str, *, expires_in: int, max_bytes: int | None) -> SignedRequest:
        """A presigned POST whose policy allows exactly ``key``, at most
        ``max_bytes`` (None: S3's own limit) and expires in ``expires_in`` seconds."""
        return self._presigned_post(
            key, self._name(key), expires_in=expires_in, max_bytes=max_bytes
        )

    def upload_into_request(
        self, folder_key: str, *, expires_in: int, max_bytes: int | None
    ) -> SignedRequest:
        """A presigned POST for the key ``<folder>/${filename}`` (S3 puts the
        uploaded part's file name there), its policy allowing any key under the
        folder."""
        return self._presigned_post(
            folder_key,
            self._name(folder_key) + "/${filename}",
            expires_in=expires_in,
            max_bytes=max_bytes,
        )
