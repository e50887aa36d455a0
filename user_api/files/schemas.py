"""Request and response bodies of the files routes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from labcloud.storage.base import EntryType


class FileInfo(BaseModel):
    """One file or folder of a user. ``path`` is relative to the user's root, with a
    trailing ``/`` for folders (as upstream); ``size`` is the upstream human string
    ("" for folders), ``size_bytes`` the exact size."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(examples=["data/run1/a.tif", "data/run1/"])
    type: EntryType
    size: str = Field(examples=["1.2 kB", "512 Bytes", ""])
    size_bytes: int = Field(ge=0)


class RenamePayload(BaseModel):
    """The new path of a file or empty folder, relative to the user's root."""

    path: str = Field(examples=["data/run2/a.tif"])


class UploadedFiles(FileInfo):
    """What an upload stored: the file's info when one was sent (the folder's, with
    the bytes in all, for several), and ``files``, the info of each."""

    files: list[FileInfo]
