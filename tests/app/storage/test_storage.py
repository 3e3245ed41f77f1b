"""The behaviour every Storage backend owes its callers, run against the local folder and S3 alike."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from app.storage import LocalStorage, ObjectNotFound, Storage, StorageError
from app.storage.base import photo_key, subject_prefix


def test_put_and_get_bytes_round_trip(any_storage: Storage) -> None:
    any_storage.put_bytes("users/u/a.bin", b"hello", content_type="text/plain")
    assert any_storage.get_bytes("users/u/a.bin") == b"hello"
    assert any_storage.exists("users/u/a.bin")
    assert any_storage.size("users/u/a.bin") == 5


def test_put_overwrites(any_storage: Storage) -> None:
    any_storage.put_bytes("k/one", b"first")
    any_storage.put_bytes("k/one", b"second")
    assert any_storage.get_bytes("k/one") == b"second"


def test_put_file_and_download_to(any_storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(bytes(range(256)) * 1000)
    any_storage.put_file("models/w.bin", source)
    target = tmp_path / "out" / "nested" / "w.bin"
    any_storage.download_to("models/w.bin", target)
    assert target.read_bytes() == source.read_bytes()


def test_missing_objects_raise_object_not_found(any_storage: Storage, tmp_path: Path) -> None:
    assert not any_storage.exists("no/such/key")
    with pytest.raises(ObjectNotFound):
        any_storage.get_bytes("no/such/key")
    with pytest.raises(ObjectNotFound):
        any_storage.size("no/such/key")
    with pytest.raises(ObjectNotFound):
        any_storage.download_to("no/such/key", tmp_path / "x")
    with pytest.raises(ObjectNotFound):
        next(iter(any_storage.iter_chunks("no/such/key")))
    any_storage.delete("no/such/key")  # deleting what is not there is not an error


def test_iter_chunks_streams_in_pieces(any_storage: Storage) -> None:
    data = bytes(range(256)) * 40  # 10,240 bytes
    any_storage.put_bytes("big/blob", data)
    chunks = list(any_storage.iter_chunks("big/blob", chunk_size=4096))
    assert b"".join(chunks) == data
    assert len(chunks) >= 3
    assert all(len(chunk) <= 4096 for chunk in chunks)


def test_list_returns_sorted_keys_under_a_prefix(any_storage: Storage) -> None:
    for key in ("a/2.txt", "a/1.txt", "a/sub/3.txt", "ab/4.txt", "b/5.txt"):
        any_storage.put_bytes(key, b"x")
    assert any_storage.list("a/") == ["a/1.txt", "a/2.txt", "a/sub/3.txt"]
    assert any_storage.list("nothing/") == []


def test_delete_removes_one_object(any_storage: Storage) -> None:
    any_storage.put_bytes("d/1", b"x")
    any_storage.put_bytes("d/2", b"x")
    any_storage.delete("d/1")
    assert any_storage.list("d/") == ["d/2"]


def test_delete_prefix_removes_a_subject_and_nothing_else(any_storage: Storage) -> None:
    owner, subject, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    mine = [photo_key(owner, subject, uuid.uuid4()) for _ in range(3)]
    mine.append(subject_prefix(owner, subject) + "weights/lora.safetensors")
    neighbour = photo_key(owner, other, uuid.uuid4())
    for key in [*mine, neighbour]:
        any_storage.put_bytes(key, b"x")
    assert any_storage.delete_prefix(subject_prefix(owner, subject)) == 4
    assert any_storage.list(subject_prefix(owner, subject)) == []
    assert any_storage.exists(neighbour)
    assert any_storage.delete_prefix(subject_prefix(owner, subject)) == 0


def test_delete_prefix_needs_a_folder(any_storage: Storage) -> None:
    any_storage.put_bytes("users/x/file", b"x")
    with pytest.raises(StorageError, match="ending in '/'"):
        any_storage.delete_prefix("users/x")
    assert any_storage.exists("users/x/file")


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../outside", "a/../../b", "a//b", "a\\b", "./a"])
def test_keys_that_could_escape_are_refused(any_storage: Storage, key: str) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        any_storage.put_bytes(key, b"x")


def test_local_storage_never_writes_outside_its_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "media")
    for key in ("../escape.txt", "a/../../escape.txt"):
        with pytest.raises(StorageError):
            storage.put_bytes(key, b"x")
    assert not (tmp_path / "escape.txt").exists()


def test_presigned_url_is_none_on_local_storage(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "media")
    storage.put_bytes("a/b", b"x")
    assert storage.presigned_url("a/b", 60) is None


def test_list_objects_gives_each_objects_size_and_write_time(any_storage: Storage) -> None:
    from datetime import timedelta

    from app.models import utcnow

    before = utcnow() - timedelta(seconds=5)
    any_storage.put_bytes("users/u/b.png", b"12345")
    any_storage.put_bytes("users/u/a.jpg", b"1")
    any_storage.put_bytes("other/c", b"x")
    listed = any_storage.list_objects("users/")
    assert [(stored.key, stored.size) for stored in listed] == [("users/u/a.jpg", 1), ("users/u/b.png", 5)]
    assert all(before <= stored.modified_at <= utcnow() + timedelta(seconds=5) for stored in listed)


def test_a_full_local_media_disk_raises_storage_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from app.storage import StorageFull, local

    storage = LocalStorage(tmp_path / "media")

    def no_room(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.shutil, "copyfileobj", no_room)
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w")
    with pytest.raises(StorageFull, match="no space left in the media storage for 'users/u/w.bin'"):
        storage.put_file("users/u/w.bin", source)
    assert storage.list("users/") == []  # no temporary file left behind


def test_listing_skips_a_folder_another_process_deletes_meanwhile(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker removes its checkpoints while the studio lists them: the listing must not fail."""
    storage = LocalStorage(tmp_path / "media")
    for key in ("jobs/1/checkpoint/a1-step10/weights", "jobs/1/checkpoint/a1-step20/weights", "jobs/1/run.json"):
        storage.put_bytes(key, b"x", "application/octet-stream")
    vanishing = tmp_path / "media" / "jobs/1/checkpoint/a1-step10"
    real_scandir = os.scandir

    def scandir_after_the_deletion(path: str | os.PathLike[str] | int) -> object:
        if not isinstance(path, int) and Path(path) == vanishing and vanishing.exists():
            shutil.rmtree(vanishing)  # listed by its parent a moment ago, gone when its turn comes
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_after_the_deletion)
    assert storage.list("jobs/1/") == ["jobs/1/checkpoint/a1-step20/weights", "jobs/1/run.json"]
