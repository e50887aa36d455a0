"""Response bodies of the worker API's files routes."""

from __future__ import annotations

from pydantic import BaseModel

from labcloud.storage import Entry


class StoredFile(BaseModel):
    """A file written to storage; ``path`` is relative to the job's location of
    that type."""

    path: str
    size: int


class StoredFiles(BaseModel):
    """What an upload stored: ``path`` and ``size`` are those of the file when one
    was sent (of the folder, and the bytes in all, for several); ``files`` lists
    each."""

    path: str
    size: int
    files: list[StoredFile]


def stored_files(folder_key: str, entries: list[Entry], *, folder: str = "") -> StoredFiles:
    """The response for ``entries`` stored in ``folder_key``; paths are relative to
    the job's location when ``folder`` (its path there) is given, else to
    ``folder_key``."""

    def path_of(key: str) -> str:
        return "/".join(part for part in (folder, key[len(folder_key) + 1 :]) if part)

    files = [StoredFile(path=path_of(entry.key), size=entry.size) for entry in entries]
    if len(files) == 1:
        return StoredFiles(path=files[0].path, size=files[0].size, files=files)
    return StoredFiles(path=folder, size=sum(f.size for f in files), files=files)
