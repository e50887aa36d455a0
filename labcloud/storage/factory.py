"""Build the storage a service's settings ask for."""

from __future__ import annotations

from labcloud.settings import FilesystemKind, ServiceSettings
from labcloud.storage.base import Storage
from labcloud.storage.local import LocalStorage
from labcloud.storage.transfers import LocalTransfers


def make_storage(settings: ServiceSettings, *, transfers: LocalTransfers | None = None) -> Storage:
    """The configured storage: a local folder (created when missing) for
    ``FILESYSTEM=local``, whose transfer requests are the signed URLs of
    ``transfers`` (the API process that serves them; None: it hands out none)."""
    if settings.filesystem is FilesystemKind.LOCAL:
        root = settings.user_data_root_path
        root.mkdir(parents=True, exist_ok=True)
        return LocalStorage(root, transfers=transfers)
    raise ValueError(f"FILESYSTEM={settings.filesystem.value} is not available in this version")
