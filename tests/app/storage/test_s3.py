"""What only the S3 backend does: presigned downloads, batched deletes, settings and bucket set-up."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.config import Settings
from app.storage import make_storage
from app.storage import s3 as s3_module
from app.storage.s3 import S3Storage, content_disposition


def test_make_storage_builds_s3_from_settings(s3_settings: Settings, s3_storage: S3Storage) -> None:
    storage = make_storage(s3_settings)
    assert isinstance(storage, S3Storage)
    assert storage.bucket == s3_settings.s3_bucket
    storage.put_bytes("a/b", b"x")
    assert s3_storage.get_bytes("a/b") == b"x"


def test_presigned_url_downloads_with_the_given_filename(s3_storage: S3Storage) -> None:
    s3_storage.put_bytes("users/u/images/1.png", b"\x89PNG fake", content_type="image/png")
    url = s3_storage.presigned_url("users/u/images/1.png", 60, filename="Rex on the beach.png")
    assert url is not None
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"\x89PNG fake"
    assert response.headers["content-type"] == "image/png"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert 'filename="Rex on the beach.png"' in disposition


def test_presigned_url_without_filename_has_no_disposition(s3_storage: S3Storage) -> None:
    s3_storage.put_bytes("a/photo.jpg", b"jpeg", content_type="image/jpeg")
    url = s3_storage.presigned_url("a/photo.jpg", 60)
    assert url is not None and "response-content-disposition" not in url
    assert httpx.get(url).content == b"jpeg"


def test_content_disposition_escapes_quotes_and_non_ascii() -> None:
    value = content_disposition('Füße "quoted".png')
    assert value == "attachment; filename=\"F__e _quoted_.png\"; filename*=UTF-8''F%C3%BC%C3%9Fe%20%22quoted%22.png"


def test_delete_prefix_deletes_in_batches(
    s3_storage: S3Storage, s3_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_module, "DELETE_BATCH", 3)  # pages and batches of 3 instead of 1000
    calls: list[int] = []
    original = s3_storage.client.delete_objects

    def counting_delete_objects(**kwargs: Any) -> Any:
        calls.append(len(kwargs["Delete"]["Objects"]))
        return original(**kwargs)

    monkeypatch.setattr(s3_storage.client, "delete_objects", counting_delete_objects)
    for index in range(8):
        s3_storage.put_bytes(f"users/u/subjects/s/photos/{index}.jpg", b"x")
    s3_storage.put_bytes("users/u/subjects/other/keep.jpg", b"x")
    assert s3_storage.delete_prefix("users/u/subjects/s/") == 8
    assert calls == [3, 3, 2]
    assert s3_storage.list("users/") == ["users/u/subjects/other/keep.jpg"]


def test_list_pages_through_more_than_one_page(s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_module, "DELETE_BATCH", 2)
    keys = [f"p/{index:02d}" for index in range(5)]
    for key in keys:
        s3_storage.put_bytes(key, b"x")
    assert s3_storage.list("p/") == keys


def test_ensure_bucket_creates_a_missing_bucket(s3_settings: Settings, s3_client: Any) -> None:
    storage = S3Storage.from_settings(s3_settings)
    storage.ensure_bucket()
    storage.ensure_bucket()  # a second time is a no-op
    storage.put_bytes("k", b"v")
    assert s3_client.get_object(Bucket=s3_settings.s3_bucket, Key="k")["Body"].read() == b"v"


def test_errors_other_than_missing_name_the_key(s3_settings: Settings) -> None:
    storage = S3Storage.from_settings(s3_settings)  # its bucket was never created
    with pytest.raises(s3_module.StorageError, match="'a/b'"):
        storage.put_bytes("a/b", b"x")


def test_urls_for_browsers_can_be_signed_for_a_public_endpoint(s3_settings: Settings, s3_storage: S3Storage) -> None:
    public = S3Storage(
        s3_storage.client,
        s3_storage.bucket,
        signing_client=S3Storage.make_client(s3_settings, "https://files.example.com"),
    )
    public.put_bytes("a/photo.jpg", b"jpeg")
    url = public.presigned_url("a/photo.jpg", 60)
    assert url is not None and url.startswith(f"https://files.example.com/{s3_storage.bucket}/a/photo.jpg?")
    assert public.get_bytes("a/photo.jpg") == b"jpeg"  # the app itself still uses the internal endpoint


@pytest.mark.parametrize("code", ["XMinioStorageFull", "InsufficientStorage"])
def test_a_full_s3_server_raises_storage_full_on_upload(s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Any, code: str) -> None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    from app.storage import StorageFull

    def refused(*_: Any, **__: Any) -> None:
        raise ClientError({"Error": {"Code": code, "Message": "Storage backend has reached its minimum free "
                                     "drive threshold."}}, "PutObject")

    def full(*_: Any, **__: Any) -> None:  # upload_file wraps the server's answer
        try:
            refused()
        except ClientError as error:
            raise S3UploadFailedError(f"Failed to upload: {error}") from error

    monkeypatch.setattr(s3_storage.client, "upload_file", full)
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w")
    with pytest.raises(StorageFull, match=code):
        s3_storage.put_file("users/u/w.bin", source)
    monkeypatch.setattr(s3_storage.client, "put_object", refused)
    with pytest.raises(StorageFull):
        s3_storage.put_bytes("users/u/x", b"x")
