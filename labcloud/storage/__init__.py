"""Storage of users' files and jobs' results: the interface, the local folder
implementation, safe paths, signed URLs and streamed transfers."""

from labcloud.storage.base import CHUNK_SIZE, Entry, EntryType, Storage
from labcloud.storage.factory import make_storage
from labcloud.storage.local import LocalStorage
from labcloud.storage.paths import (
    UnknownArea,
    UnsafePath,
    UserKeyParts,
    area_key,
    check_key,
    child_key,
    normalise_path,
    split_user_key,
    user_key,
    user_relative_path,
    user_root_key,
)
from labcloud.storage.signing import (
    Audience,
    SignedTransfer,
    SignedUrlInvalid,
    SignedUrlOwnerInactive,
    SignedUrlUsed,
    TransferPurpose,
    UrlSigner,
)
from labcloud.storage.zipstream import zip_stream

__all__ = [
    "CHUNK_SIZE",
    "Audience",
    "Entry",
    "EntryType",
    "LocalStorage",
    "SignedTransfer",
    "SignedUrlInvalid",
    "SignedUrlOwnerInactive",
    "SignedUrlUsed",
    "Storage",
    "TransferPurpose",
    "UnknownArea",
    "UnsafePath",
    "UrlSigner",
    "UserKeyParts",
    "area_key",
    "check_key",
    "child_key",
    "make_storage",
    "normalise_path",
    "split_user_key",
    "user_key",
    "user_relative_path",
    "user_root_key",
    "zip_stream",
]
