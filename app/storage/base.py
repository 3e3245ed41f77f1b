"""The Storage protocol every backend implements, and the layout of keys.

Keys are built from server ids only (never from a client's filename), so a subject's files all
live under one prefix and deleting the subject is one ``delete_prefix``.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

CHUNK_SIZE = 1024 * 1024


class StorageError(Exception):
    """A storage operation failed; the message names the key."""


class ObjectNotFound(StorageError):
    """No object under that key."""


class StorageFull(StorageError):
    """The storage itself has no room left (a full media disk, a bucket's server out of space or quota)."""


@dataclass(frozen=True)
class StoredObject:
    """One object as a listing sees it: its key, size and when it was last written (UTC)."""

    key: str
    size: int
    modified_at: datetime


class Storage(Protocol):
    """Private object storage. Nothing in it is public: reads go through owner-checked routes or signed URLs."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def download_to(self, key: str, path: Path) -> None: ...

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def list(self, prefix: str) -> list[str]: ...

    def list_objects(self, prefix: str) -> builtins.list[StoredObject]:
        """The objects under ``prefix`` with their size and last-write time, sorted by key."""
        ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def presigned_url(self, key: str, expires_seconds: int, filename: str | None = None) -> str | None:
        """A direct, short-lived download URL, or None when the backend has none (then the app streams)."""
        ...


def subject_prefix(owner_id: uuid.UUID, subject_id: uuid.UUID) -> str:
    return f"users/{owner_id}/subjects/{subject_id}/"


def photo_key(owner_id: uuid.UUID, subject_id: uuid.UUID, photo_id: uuid.UUID) -> str:
    return f"{subject_prefix(owner_id, subject_id)}photos/{photo_id}.jpg"


def image_key(owner_id: uuid.UUID, subject_id: uuid.UUID, image_id: uuid.UUID) -> str:
    return f"{subject_prefix(owner_id, subject_id)}images/{image_id}.png"


def job_prefix(owner_id: uuid.UUID, subject_id: uuid.UUID, job_id: uuid.UUID) -> str:
    """The folder of one job's transient files: its previews and checkpoints."""
    return f"{subject_prefix(owner_id, subject_id)}jobs/{job_id}/"


def preview_key(owner_id: uuid.UUID, subject_id: uuid.UUID, job_id: uuid.UUID, name: str) -> str:
    return f"{job_prefix(owner_id, subject_id, job_id)}previews/{name}"


def weights_prefix(owner_id: uuid.UUID, subject_id: uuid.UUID) -> str:
    return f"{subject_prefix(owner_id, subject_id)}weights/"


def checkpoint_prefix(owner_id: uuid.UUID, subject_id: uuid.UUID, job_id: uuid.UUID) -> str:
    return f"{job_prefix(owner_id, subject_id, job_id)}checkpoint/"


def zip_key(owner_id: uuid.UUID, subject_id: uuid.UUID, name: str) -> str:
    return f"{subject_prefix(owner_id, subject_id)}zips/{name}"


def prior_bank_prefix(bank_key: str) -> str:
    return f"priors/{bank_key}/"
