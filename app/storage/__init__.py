"""Private object storage: a local folder or an S3-compatible bucket, chosen by settings."""

from __future__ import annotations

from functools import lru_cache

from app.config import Settings, get_settings
from app.storage.base import ObjectNotFound, Storage, StorageError, StorageFull, StoredObject
from app.storage.local import LocalStorage


def make_storage(settings: Settings) -> Storage:
    if settings.storage_backend == "s3":
        from app.storage.s3 import S3Storage

        return S3Storage.from_settings(settings)
    return LocalStorage(settings.resolved_media_dir)


@lru_cache
def get_storage() -> Storage:
    return make_storage(get_settings())


__all__ = [
    "LocalStorage",
    "ObjectNotFound",
    "Storage",
    "StorageError",
    "StorageFull",
    "StoredObject",
    "get_storage",
    "make_storage",
]
