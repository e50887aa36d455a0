"""Build the storage a service's settings ask for."""

from __future__ import annotations

from labcloud.settings import FilesystemKind, ServiceSettings
from labcloud.storage.base import Storage
from labcloud.storage.local import LocalStorage
from labcloud.storage.transfers import LocalTransfers


def make_storage(settings: ServiceSettings, *, transfers: LocalTransfers | None = None) -> Storage:
    """The configured storage: a local folder (created when missing) for
    ``FILESYSTEM=local``, whose transfer requests are the signed URLs of
    ``transfers`` (the API process that serves them; None: it hands out none); for
    ``FILESYSTEM=s3``, ``S3_BUCKET`` under the key prefix ``USER_DATA_ROOT_PATH``,
    whose requests are presigned (``transfers`` is not used). Raises
    ``BucketUnavailable`` naming S3_BUCKET when the bucket cannot be used."""
    if settings.filesystem is FilesystemKind.LOCAL:
        root = settings.user_data_root_path
        root.mkdir(parents=True, exist_ok=True)
        return LocalStorage(root, transfers=transfers)
    if settings.filesystem is FilesystemKind.S3:
        # Imported here: only deployments on S3 load boto3.
        from labcloud.storage.s3 import S3Storage, check_bucket, s3_client

        assert settings.s3_bucket is not None  # checked by the settings
        client = s3_client(region=settings.s3_region, endpoint_url=settings.s3_endpoint_url)
        # Checked again here for settings built without validation (model_copy).
        check_bucket(client, settings.s3_bucket)
        return S3Storage(client, settings.s3_bucket, prefix=settings.user_data_root_path.as_posix())
    raise ValueError(f"FILESYSTEM={settings.filesystem.value} is not available in this version")
