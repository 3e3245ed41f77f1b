"""A Storage backend on an S3-compatible bucket (AWS S3, MinIO, Ceph...), with boto3.

The bucket stays private: the app reads through it, and downloads go through short-lived
presigned URLs. Path-style addressing is used so MinIO and other self-hosted servers work
without wildcard DNS.
"""

from __future__ import annotations

import builtins
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.config import Settings
from app.storage.base import CHUNK_SIZE, ObjectNotFound, StorageError, StorageFull, StoredObject

DELETE_BATCH = 1000  # the most keys one DeleteObjects call accepts
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
# What S3-compatible servers answer when they have no room left (MinIO, Ceph, the HTTP status).
_FULL_CODES = {"XMinioStorageFull", "InsufficientStorage", "QuotaExceeded", "507"}


def _check_key(key: str) -> str:
    """Refuse keys the local backend would refuse too, so both behave the same for every caller."""
    if not key or key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in key.split("/")):
        raise StorageError(f"invalid storage key {key!r}")
    return key


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def content_disposition(filename: str) -> str:
    """An ``attachment`` header value that survives any filename (RFC 6266 with an ASCII fallback)."""
    fallback = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\' else "_" for ch in filename) or "download"
    quoted = urllib.parse.quote(filename, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quoted}"


class S3Storage:
    def __init__(self, client: Any, bucket: str, signing_client: Any | None = None) -> None:
        """``client`` is a boto3 S3 client; :meth:`from_settings` builds one from the studio's settings.

        ``signing_client`` signs the download URLs handed to browsers. It is only needed when the
        browsers reach the bucket at another address than the app does (compose: the app talks to
        ``http://minio:9000``, a browser to ``https://files.example.com``); by default ``client`` signs.
        """
        self.client = client
        self.bucket = bucket
        self.signing_client = signing_client or client

    @staticmethod
    def make_client(settings: Settings, endpoint_url: str | None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key,
            aws_secret_access_key=settings.s3_secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 5, "mode": "standard"},
            ),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        """A backend on ``settings.s3_bucket``; URLs for browsers are signed for the public endpoint when
        the settings name one (``s3_public_endpoint_url``), else for ``s3_endpoint_url``."""
        # Read defensively: the public endpoint is an optional setting that older settings lack.
        public_endpoint: str | None = settings.s3_public_endpoint_url
        signing_client = cls.make_client(settings, public_endpoint) if public_endpoint else None
        return cls(cls.make_client(settings, settings.s3_endpoint_url), settings.s3_bucket, signing_client)

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist yet (first start against a fresh MinIO)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _error_code(error) not in _MISSING_CODES | {"NoSuchBucket"}:
                raise StorageError(f"bucket {self.bucket!r} is not usable: {_error_code(error)}") from error
            self.client.create_bucket(Bucket=self.bucket)

    def _failure(self, action: str, key: str, error: ClientError | BotoCoreError | S3UploadFailedError) -> StorageError:
        if isinstance(error, S3UploadFailedError):
            # upload_file wraps the server's answer; the ClientError it came from names the code.
            cause = error.__cause__ or error.__context__
            if isinstance(cause, ClientError):
                return self._failure(action, key, cause)
            if any(code in str(error) for code in _FULL_CODES):
                return StorageFull(f"could not {action} {key!r} in bucket {self.bucket!r}: the storage is full")
            return StorageError(f"could not {action} {key!r} in bucket {self.bucket!r}: {error}")
        if isinstance(error, ClientError) and _error_code(error) in _MISSING_CODES:
            return ObjectNotFound(key)
        if isinstance(error, ClientError) and _error_code(error) in _FULL_CODES:
            return StorageFull(f"could not {action} {key!r} in bucket {self.bucket!r}: {_error_code(error)}")
        detail = _error_code(error) if isinstance(error, ClientError) else type(error).__name__
        return StorageError(f"could not {action} {key!r} in bucket {self.bucket!r}: {detail}")

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=_check_key(key), Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as error:
            raise self._failure("store", key, error) from error

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        # upload_file switches to a multipart upload for large files (trained weights).
        try:
            self.client.upload_file(str(path), self.bucket, _check_key(key), ExtraArgs={"ContentType": content_type})
        except (ClientError, BotoCoreError, S3UploadFailedError) as error:
            raise self._failure("store", key, error) from error

    def get_bytes(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=_check_key(key))
        except (ClientError, BotoCoreError) as error:
            raise self._failure("read", key, error) from error
        body = response["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def download_to(self, key: str, path: Path) -> None:
        _check_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # download_file writes to a temporary name and renames it: no half-written file on failure.
            self.client.download_file(self.bucket, key, str(path))
        except (ClientError, BotoCoreError) as error:
            raise self._failure("download", key, error) from error

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The object's bytes, streamed: memory stays at one chunk whatever the object's size.

        The object is opened on the first ``next()``, so a missing key raises ObjectNotFound there.
        """
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=_check_key(key))
        except (ClientError, BotoCoreError) as error:
            raise self._failure("read", key, error) from error
        body = response["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=_check_key(key))
        except ClientError as error:
            if _error_code(error) in _MISSING_CODES:
                return None
            raise self._failure("inspect", key, error) from error
        except BotoCoreError as error:
            raise self._failure("inspect", key, error) from error
        return head

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise ObjectNotFound(key)
        return int(head["ContentLength"])

    def _iter_object_pages(self, prefix: str) -> Iterator[list[dict[str, Any]]]:
        """The objects under ``prefix``, one list_objects_v2 page (at most 1000) at a time."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": DELETE_BATCH}
            ):
                yield list(page.get("Contents", []))
        except (ClientError, BotoCoreError) as error:
            raise self._failure("list", prefix, error) from error

    def _iter_pages(self, prefix: str) -> Iterator[list[str]]:
        """The keys under ``prefix``, one list_objects_v2 page (at most 1000 keys) at a time."""
        for page in self._iter_object_pages(prefix):
            yield [str(item["Key"]) for item in page]

    def list(self, prefix: str) -> list[str]:
        return sorted(key for page in self._iter_pages(prefix) for key in page)

    def list_objects(self, prefix: str) -> builtins.list[StoredObject]:
        found = [StoredObject(str(item["Key"]), int(item.get("Size", 0)), item["LastModified"])
                 for page in self._iter_object_pages(prefix) for item in page]
        return sorted(found, key=lambda stored: stored.key)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=_check_key(key))
        except (ClientError, BotoCoreError) as error:
            raise self._failure("delete", key, error) from error

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix``, page by page (1000 keys a request); returns how many.

        Deleting while paging is safe: the continuation token names the last key listed, not a position.
        """
        if not prefix.endswith("/"):
            raise StorageError(f"delete_prefix needs a folder prefix ending in '/', got {prefix!r}")
        _check_key(prefix.rstrip("/"))
        deleted = 0
        for keys in self._iter_pages(prefix):
            for start in range(0, len(keys), DELETE_BATCH):
                deleted += self._delete_batch(keys[start : start + DELETE_BATCH])
        return deleted

    def _delete_batch(self, keys: builtins.list[str]) -> int:
        try:
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True}
            )
        except (ClientError, BotoCoreError) as error:
            raise self._failure("delete", keys[0], error) from error
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise StorageError(
                f"could not delete {len(errors)} of {len(keys)} objects in bucket {self.bucket!r}, "
                f"e.g. {first.get('Key')!r}: {first.get('Code')}"
            )
        return len(keys)

    def presigned_url(self, key: str, expires_seconds: int, filename: str | None = None) -> str | None:
        """A GET URL valid for ``expires_seconds``; with ``filename`` the browser saves it under that name."""
        params: dict[str, str] = {"Bucket": self.bucket, "Key": _check_key(key)}
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename)
        # Signing is local computation: no request goes to the (possibly unreachable) public endpoint.
        url: str = self.signing_client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_seconds)
        return url
