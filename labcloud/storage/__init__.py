"""Storage of users' files and jobs' results: the interface (files, and transfer
requests that move them without the API's bearer token), the local folder
implementation with its signed URLs, safe paths and streamed transfers.

The S3 implementation (``labcloud.storage.s3.S3Storage``, presigned transfers) is
not imported here: it loads boto3, which only deployments on S3 need;
``make_storage`` builds it for ``FILESYSTEM=s3``."""

from labcloud.storage.base import CHUNK_SIZE, Entry, EntryType, Storage
from labcloud.storage.factory import make_storage
from labcloud.storage.local import (
    LocalStorage,
    SignedUrlsNotServed,
    TransfersUnavailable,
    signed_url_storage,
)
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
from labcloud.storage.transfers import LocalTransfers, UploadTooLarge, upload_targets
from labcloud.storage.uploads import IncomingFile
from labcloud.storage.zipstream import zip_stream

__all__ = [
    "CHUNK_SIZE",
    "Audience",
    "Entry",
    "EntryType",
    "IncomingFile",
    "LocalStorage",
    "LocalTransfers",
    "SignedTransfer",
    "SignedUrlInvalid",
    "SignedUrlOwnerInactive",
    "SignedUrlUsed",
    "SignedUrlsNotServed",
    "Storage",
    "TransferPurpose",
    "TransfersUnavailable",
    "UnknownArea",
    "UnsafePath",
    "UploadTooLarge",
    "UrlSigner",
    "UserKeyParts",
    "area_key",
    "check_key",
    "child_key",
    "make_storage",
    "normalise_path",
    "signed_url_storage",
    "split_user_key",
    "upload_targets",
    "user_key",
    "user_relative_path",
    "user_root_key",
    "zip_stream",
]
