"""Build the storage a service's settings ask for."""

from __future__ import annotations

from labcloud.settings import FilesystemKind, ServiceSettings
from labcloud.storage.base import Storage
from labcloud.storage.local import LocalStorage


def make_storage(settings: ServiceSettings) -> Storage:
    """The configured storage: a local folder (created when missing) for
    ``FILESYSTEM=local``."""
    if settings.filesystem is FilesystemKind.LOCAL:
        root = settings.user_data_root_path
        root.mkdir(parents=True, exist_ok=True)
        return LocalStorage(root)
    raise ValueError(f"FILESYSTEM={settings.filesystem.value} is not available in this version")
