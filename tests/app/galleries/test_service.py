"""Gallery rules: names, grouping, favourites, "generate more", and the streamed ZIP."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tracemalloc
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.galleries import repository, service
from app.models import GenerationRequest, Job, utcnow
from app.storage import LocalStorage
from tests.app.factories import make_image, make_job, make_subject, make_user
from tests.app.galleries.conftest import SentTasks


@pytest.mark.parametrize(
    ("template", "name", "expected"),
    [
        ("a photo of {subject} on the beach", "Rex", "rex-on-the-beach"),
        ("an oil painting portrait of {subject}", "Ann Lee", "an-oil-painting-portrait-of-ann-lee"),
        ("A picture of {subject}, wearing a hat!", "Mimi", "mimi-wearing-a-hat"),
        ("{subject} in Zürich", "Zoë", "zoe-in-zurich"),
        ("a photo of {subject}", "🐶", "image"),
    ],
)
def test_prompt_slug(template: str, name: str, expected: str) -> None:
    assert service.prompt_slug(template, name) == expected


def test_slugs_are_bounded() -> None:
    slug = service.slugify("word " * 100)
    assert len(slug) <= service.SLUG_MAX_CHARS
    assert not slug.endswith("-")


def test_download_filename_counts_within_the_prompt(db_session: Session, storage: LocalStorage) -> None:
    subject = make_subject(db_session, make_user(db_session))
    job = make_job(db_session, subject, status="done", stage="finished")
    start = utcnow()
    beach = [make_image(db_session, storage, subject, job, seed=s, created_at=start) for s in (3, 1, 2)]
    snow = make_image(db_session, storage, subject, job, "a photo of {subject} in the snow", created_at=start)
    assert [repository.position_in_prompt(db_session, image) for image in beach] == [3, 1, 2]
    assert service.download_filename(subject, beach[0], 3) == "rex-on-the-beach-3.png"
    assert repository.position_in_prompt(db_session, snow) == 1


def test_group_by_prompt_keeps_the_given_order_inside_groups(db_session: Session, storage: LocalStorage) -> None:
    subject = make_subject(db_session, make_user(db_session))
    job = make_job(db_session, subject)
    start = utcnow()
    first = make_image(db_session, storage, subject, job, seed=0, rank=3, created_at=start)
    second = make_image(db_session, storage, subject, job, seed=1, rank=1, created_at=start + timedelta(seconds=1))
    snow = make_image(db_session, storage, subject, job, "{subject} in the snow", seed=0, rank=2,
                      created_at=start + timedelta(seconds=2))
    by_likeness = repository.images_of_subject(db_session, subject.id, subject.owner_id, sort="likeness")
    assert by_likeness == [second, snow, first]
    groups = service.group_by_prompt(subject, by_likeness)
    assert [group.template for group in groups] == ["a photo of {subject} on the beach", "{subject} in the snow"]
    assert groups[0].images == [second, first]
    assert groups[0].readable == "a photo of Rex on the beach"
    assert groups[0].parts == ["a photo of ", " on the beach"]
    assert service.has_scores(by_likeness)


def test_favourites_filter(db_session: Session, storage: LocalStorage) -> None:
    subject = make_subject(db_session, make_user(db_session))
    job = make_job(db_session, subject)
    liked = make_image(db_session, storage, subject, job, seed=1)
    make_image(db_session, storage, subject, job, seed=2)
    service.set_favourite(db_session, liked, True)
    assert repository.images_of_subject(db_session, subject.id, subject.owner_id, favourites_only=True) == [liked]
    other = make_user(db_session)
    assert repository.images_of_subject(db_session, subject.id, other.id) == []
    assert repository.get_image(db_session, liked.id, other.id) is None


def test_generate_more_creates_the_job_and_enqueues_after_commit(
    db_session: Session, settings: Settings, sent_tasks: SentTasks
) -> None:
    subject = make_subject(db_session, make_user(db_session), weights_key="users/x/weights/lora.safetensors")
    job = service.request_generation(
        db_session, settings, subject, ["on a skateboard", "", "a photo of {subject} in space", "on a skateboard"], 3
    )
    assert (job.kind, job.status, job.max_attempts) == ("generate", "queued", settings.max_attempts)
    assert job.enqueued_at is None  # stamped once the broker took the message, after the commit
    request = db_session.scalars(select(GenerationRequest).where(GenerationRequest.job_id == job.id)).one()
    assert request.prompts == ["a photo of {subject}, on a skateboard", "a photo of {subject} in space"]
    assert request.images_per_prompt == 3
    assert job.details["images_total"] == 6
    assert sent_tasks == []  # nothing leaves before the commit
    db_session.commit()
    assert sent_tasks == [("generation.run", {"job_id": str(job.id)})]
    db_session.refresh(job)
    assert job.enqueued_at is not None


def test_generate_more_refusals(db_session: Session, settings: Settings, sent_tasks: SentTasks) -> None:
    owner = make_user(db_session)
    untrained = make_subject(db_session, owner)
    with pytest.raises(service.GenerationNotPossible, match="no trained model"):
        service.request_generation(db_session, settings, untrained, ["in the snow"], 2)

    trained = make_subject(db_session, owner, weights_key="w")
    with pytest.raises(service.InvalidGenerationRequest, match="at least one prompt"):
        service.request_generation(db_session, settings, trained, ["  ", ""], 2)
    with pytest.raises(service.InvalidGenerationRequest, match="between 1 and"):
        service.request_generation(db_session, settings, trained, ["in the snow"], settings.max_images_per_prompt + 1)
    with pytest.raises(service.InvalidGenerationRequest, match="too long"):
        service.request_generation(db_session, settings, trained, ["x" * 400], 1)
    with pytest.raises(service.InvalidGenerationRequest, match=f"At most {settings.max_prompts}"):
        service.request_generation(db_session, settings, trained, [f"scene {n}" for n in range(50)], 1)

    make_job(db_session, trained, status="running", stage="training")
    with pytest.raises(service.GenerationNotPossible, match="in progress"):
        service.request_generation(db_session, settings, trained, ["in the snow"], 2)

    busy_owner = make_user(db_session)
    for _ in range(settings.max_active_jobs_per_user):
        make_job(db_session, make_subject(db_session, busy_owner))
    idle = make_subject(db_session, busy_owner, weights_key="w")
    with pytest.raises(service.TooManyActiveJobs):
        service.request_generation(db_session, settings, idle, ["in the snow"], 2)
    assert db_session.scalars(select(Job).where(Job.kind == "generate")).all() == []


def _archive(storage: LocalStorage, entries: list[service.ZipEntry]) -> zipfile.ZipFile:
    data = b"".join(service.iter_zip(storage, entries, {"studio": "Rex"}))
    return zipfile.ZipFile(io.BytesIO(data))


def test_zip_is_a_valid_archive_named_by_prompt_with_a_manifest(db_session: Session, storage: LocalStorage) -> None:
    subject = make_subject(db_session, make_user(db_session))
    job = make_job(db_session, subject)
    start = utcnow()
    beach = [make_image(db_session, storage, subject, job, seed=s, created_at=start, dino=0.5 + s / 10, rank=s + 1)
             for s in range(2)]
    snow = make_image(db_session, storage, subject, job, "a photo of {subject} in the snow", seed=7)
    # Another template with the same slug gets its own folder rather than mixing files.
    twin = make_image(db_session, storage, subject, job, "A photo of {subject} on the beach", seed=9)

    images = repository.images_of_subject(db_session, subject.id, subject.owner_id)
    archive = _archive(storage, service.zip_entries(subject, images))
    assert archive.testzip() is None
    names = sorted(archive.namelist())
    assert names == ["manifest.json", "rex-in-the-snow/1.png", "rex-on-the-beach-2/1.png",
                     "rex-on-the-beach/1.png", "rex-on-the-beach/2.png"]
    assert archive.read("rex-on-the-beach/2.png") == storage.get_bytes(beach[1].storage_key)
    assert archive.read("rex-in-the-snow/1.png") == storage.get_bytes(snow.storage_key)
    assert archive.read("rex-on-the-beach-2/1.png") == storage.get_bytes(twin.storage_key)
    assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())

    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["studio"] == "Rex"
    by_file = {entry["file"]: entry for entry in manifest["images"]}
    assert by_file["rex-on-the-beach/2.png"]["seed"] == 1
    assert by_file["rex-on-the-beach/2.png"]["prompt"] == "a photo of qzx dog on the beach"
    assert by_file["rex-on-the-beach/2.png"]["scores"] == {"dino": pytest.approx(0.6), "clip_i": None, "clip_t": None,
                                                          "face_distance": None}
    assert by_file["rex-on-the-beach/2.png"]["rank"] == 2
    assert manifest["missing"] == []


def test_zip_skips_an_image_deleted_meanwhile_and_says_so(db_session: Session, storage: LocalStorage) -> None:
    subject = make_subject(db_session, make_user(db_session))
    job = make_job(db_session, subject)
    kept = make_image(db_session, storage, subject, job, seed=0)
    gone = make_image(db_session, storage, subject, job, "{subject} in the snow", seed=1)
    storage.delete(gone.storage_key)
    archive = _archive(storage, service.zip_entries(subject, [kept, gone]))
    assert sorted(archive.namelist()) == ["manifest.json", "rex-on-the-beach/1.png"]
    assert json.loads(archive.read("manifest.json"))["missing"] == ["rex-in-the-snow/1.png"]


def test_zip_writes_zip64_records_for_big_galleries(
    db_session: Session, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real 4 GiB or 65,536-entry gallery is too slow for a unit test: lower zipfile's entry-count
    # limit so the same code path writes the ZIP64 end records.
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 3)
    subject = make_subject(db_session, make_user(db_session))
    job = make_job(db_session, subject)
    images = [make_image(db_session, storage, subject, job, seed=s) for s in range(5)]
    data = b"".join(service.iter_zip(storage, service.zip_entries(subject, images), {}))
    assert b"PK\x06\x06" in data  # the ZIP64 end of central directory record
    assert len(zipfile.ZipFile(io.BytesIO(data)).namelist()) == 6


def test_zip_streams_with_flat_memory(db_session: Session, storage: LocalStorage) -> None:
    """50 images of 1 MB: the generator never holds more than a few chunks, let alone the archive."""
    subject = make_subject(db_session, make_user(db_session))
    job = make_job(db_session, subject)
    image_bytes = 1024 * 1024
    images = [make_image(db_session, storage, subject, job, seed=s, data=os.urandom(image_bytes)) for s in range(50)]
    entries = service.zip_entries(subject, images)

    total = 0
    pieces = 0
    tracemalloc.start()
    try:
        for piece in service.iter_zip(storage, entries, {}):
            total += len(piece)
            pieces += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 50 * image_bytes
    assert pieces > 50  # it really came out piece by piece
    assert peak < 6 * image_bytes, f"peak {peak} bytes while streaming {total}"


@pytest.mark.parametrize("zip64_limit", [None, 1000])
def test_zip_passes_an_independent_unzip(
    db_session: Session, storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    zip64_limit: int | None,
) -> None:
    """Info-ZIP's ``unzip -t`` accepts the archive: stored entries with data descriptors and, once offsets
    pass the ZIP64 limit (lowered here from 4 GiB to 1000 bytes), ZIP64 offsets and end records."""
    unzip = shutil.which("unzip")
    if unzip is None:
        pytest.skip("needs Info-ZIP's unzip")
    if zip64_limit is not None:
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", zip64_limit)
    subject = make_subject(db_session, make_user(db_session))
    job = make_job(db_session, subject)
    images = [make_image(db_session, storage, subject, job, seed=s) for s in range(20)]
    archive = tmp_path / "gallery.zip"
    archive.write_bytes(b"".join(service.iter_zip(storage, service.zip_entries(subject, images), {})))
    assert (b"PK\x06\x06" in archive.read_bytes()) == (zip64_limit is not None)
    result = subprocess.run([unzip, "-t", str(archive)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors detected" in result.stdout
