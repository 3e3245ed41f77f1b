"""A Storage backend on a local folder. Writes are atomic: a temporary file, then a rename."""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from app.storage.base import CHUNK_SIZE, ObjectNotFound, StorageError, StorageFull, StoredObject


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        """The file of ``key``; refuses keys that would escape the root."""
        if not key or key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in key.split("/")):
            raise StorageError(f"invalid storage key {key!r}")
        return self.root / key

    def _write_atomically(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        target = self.path_for(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    write(handle)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                # Named apart from the worker's own disk: the person reads which one is full.
                raise StorageFull(f"no space left in the media storage for {key!r}") from error
            raise

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._write_atomically(key, lambda handle: handle.write(data))

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        def copy(handle: BinaryIO) -> None:
            with path.open("rb") as source:
                shutil.copyfileobj(source, handle, CHUNK_SIZE)

        self._write_atomically(key, copy)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path_for(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def download_to(self, key: str, path: Path) -> None:
        source = self.path_for(key)
        if not source.is_file():
            raise ObjectNotFound(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        try:
            handle = self.path_for(key).open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        with handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path_for(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        # os.walk, not Path.rglob: another process may delete a folder while it is walked (a worker
        # removing its checkpoints while the studio lists them), and os.walk skips what vanished.
        keys = [(Path(folder) / name).relative_to(self.root).as_posix()
                for folder, _, files in os.walk(base) for name in files]
        return sorted(k for k in keys if k.startswith(prefix) and not k.rsplit("/", 1)[-1].startswith(".tmp-"))

    def list_objects(self, prefix: str) -> builtins.list[StoredObject]:
        found = []
        for key in self.list(prefix):
            try:
                stat = self.path_for(key).stat()
            except FileNotFoundError:
                continue  # deleted since the listing
            found.append(StoredObject(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
        return found

    def delete(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix.endswith("/"):
            raise StorageError(f"delete_prefix needs a folder prefix ending in '/', got {prefix!r}")
        folder = self.path_for(prefix.rstrip("/"))
        if not folder.exists():
            return 0
        count = sum(1 for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
        return count

    def presigned_url(self, key: str, expires_seconds: int, filename: str | None = None) -> str | None:
        return None
