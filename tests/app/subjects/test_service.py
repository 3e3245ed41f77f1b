"""Creating a studio: all checks before anything is stored, then rows, photos and a training job enqueued."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Job, Photo, Subject, User, utcnow
from app.storage import LocalStorage
from app.subjects.schemas import CreateStudio
from app.subjects.service import (
    StudioRejected,
    TooManyActiveJobs,
    TooManyStudiosThisHour,
    create_studio,
    studio_cards,
)
from tests.app import factories, photo_factory
from tests.app.subjects.conftest import SentTask

DOG = CreateStudio(name="Rex", kind="dog", consent=True)


def count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


@pytest.fixture
def owner(db_session: Session) -> User:
    return factories.make_user(db_session, "owner@example.com")


def rejected(
    db_session: Session, storage: LocalStorage, settings: Settings, owner: User, form: CreateStudio, files: list
) -> StudioRejected:
    with pytest.raises(StudioRejected) as caught:
        create_studio(db_session, storage, settings, owner, form, files)
    return caught.value


def test_valid_request_creates_subject_photos_and_a_queued_job(
    db_session: Session,
    storage: LocalStorage,
    settings: Settings,
    owner: User,
    valid_photos: list[tuple[str, bytes]],
    sent_tasks: list[SentTask],
) -> None:
    form = replace(DOG, prompts=("on a skateboard", "a {subject} in space"), images_per_prompt=2, quality="fast")
    subject, job = create_studio(db_session, storage, settings, owner, form, valid_photos)
    assert sent_tasks == []  # nothing is sent before the transaction commits
    db_session.commit()
    assert sent_tasks == [SentTask("training.run", {"job_id": str(job.id)}, sent_tasks[0].queue)]

    assert (subject.name, subject.kind, subject.class_noun, subject.style_pack) == (
        "Rex",
        "dog",
        "dog",
        "pet-adventures",
    )
    assert subject.prompts == ["a photo of {subject}, on a skateboard", "a {subject} in space"]
    assert (subject.images_per_prompt, subject.quality) == (2, "fast")
    assert subject.consent_at is not None
    expected_expiry = utcnow() + timedelta(days=settings.retention_days)
    assert abs(subject.expires_at - expected_expiry) < timedelta(minutes=1)
    assert (job.kind, job.status, job.stage, job.owner_id) == ("train", "queued", "queued", owner.id)
    assert job.max_attempts == settings.max_attempts
    db_session.refresh(job)
    assert job.enqueued_at is not None  # stamped after the send that followed the commit

    photos = list(db_session.scalars(select(Photo).order_by(Photo.position)))
    assert [photo.original_name for photo in photos] == ["photo1.jpg", "photo2.jpg", "photo3.jpg"]
    assert sorted(storage.list(f"users/{owner.id}/")) == sorted(photo.storage_key for photo in photos)
    for photo in photos:
        assert photo.storage_key == f"users/{owner.id}/subjects/{subject.id}/photos/{photo.id}.jpg"
        stored = storage.get_bytes(photo.storage_key)
        assert photo.byte_size == len(stored)
        assert Image.open(io.BytesIO(stored)).format == "JPEG"


def test_control_characters_are_removed_from_text_fields(
    db_session: Session,
    storage: LocalStorage,
    settings: Settings,
    owner: User,
    valid_photos: list[tuple[str, bytes]],
    sent_tasks: list[SentTask],
) -> None:
    form = replace(DOG, name="Re\x00x\t the\ndog", prompts=("on a\x00 boat\x1b",))
    subject, _ = create_studio(db_session, storage, settings, owner, form, valid_photos)
    db_session.commit()  # PostgreSQL would refuse a NUL here
    assert subject.name == "Re x the dog"
    assert subject.prompts == ["a photo of {subject}, on a boat"]


def test_stored_photo_has_no_exif_at_all(
    db_session: Session, storage: LocalStorage, settings: Settings, owner: User, sent_tasks: list[SentTask]
) -> None:
    files = [("gps.jpg", photo_factory.make_jpeg_with_metadata(40)), *photo_factory.make_photos(2, start_seed=41)]
    create_studio(db_session, storage, settings, owner, DOG, files)
    gps_photo = db_session.scalars(select(Photo).where(Photo.original_name == "gps.jpg")).one()
    stored = storage.get_bytes(gps_photo.storage_key)
    assert not Image.open(io.BytesIO(stored)).getexif()
    assert 0xE1 not in photo_factory.jpeg_markers(stored)


@pytest.mark.parametrize(
    ("form", "field"),
    [
        (replace(DOG, name="   "), "name"),
        (replace(DOG, name="x" * 101), "name"),
        (replace(DOG, kind="dragon"), "kind"),
        (replace(DOG, kind="animal", class_noun=""), "class_noun"),
        (replace(DOG, kind="animal", class_noun="rabbit9"), "class_noun"),
        (replace(DOG, kind="animal", class_noun="a" * 31), "class_noun"),
        (replace(DOG, kind="person", class_noun="robot", style_pack="portrait-classics"), "class_noun"),
        (replace(DOG, style_pack="no-such-pack"), "style_pack"),
        (replace(DOG, style_pack="portrait-classics"), "style_pack"),
        (replace(DOG, prompts=("x" * 201,)), "prompts"),
        (replace(DOG, prompts=tuple(f"prompt {n}" for n in range(21))), "prompts"),
        (replace(DOG, images_per_prompt=0), "images_per_prompt"),
        (replace(DOG, images_per_prompt=9), "images_per_prompt"),
        (replace(DOG, images_per_prompt=None), "images_per_prompt"),
        (replace(DOG, quality="ultra"), "quality"),
        (replace(DOG, consent=False), "consent"),
    ],
)
def test_bad_fields_are_refused_and_nothing_is_stored(
    db_session: Session,
    storage: LocalStorage,
    settings: Settings,
    owner: User,
    valid_photos: list[tuple[str, bytes]],
    person_photos: list[tuple[str, bytes]],
    form: CreateStudio,
    field: str,
) -> None:
    photos = person_photos if form.kind == "person" else valid_photos
    error = rejected(db_session, storage, settings, owner, form, photos)
    assert list(error.problems.fields) == [field]
    assert error.problems.files == []
    assert count(db_session, Subject) == count(db_session, Job) == 0
    assert storage.list("users/") == []


@pytest.mark.parametrize(
    ("kind", "typed", "expected"),
    [
        ("dog", "wolf", "dog"),
        ("cat", "", "cat"),
        ("animal", "  Guinea   Pig ", "guinea pig"),
        ("person", "", "person"),
        ("person", "Woman", "woman"),
    ],
)
def test_class_noun_follows_the_kind(
    db_session: Session,
    storage: LocalStorage,
    settings: Settings,
    owner: User,
    valid_photos: list[tuple[str, bytes]],
    person_photos: list[tuple[str, bytes]],
    sent_tasks: list[SentTask],
    kind: str,
    typed: str,
    expected: str,
) -> None:
    form = replace(DOG, kind=kind, class_noun=typed)
    photos = person_photos if kind == "person" else valid_photos
    subject, _ = create_studio(db_session, storage, settings, owner, form, photos)
    assert subject.class_noun == expected
    assert subject.style_pack == ("portrait-classics" if kind == "person" else "pet-adventures")


def test_every_bad_file_is_listed_and_nothing_is_stored(
    db_session: Session, storage: LocalStorage, settings: Settings, owner: User
) -> None:
    files = [
        *photo_factory.make_photos(3, start_seed=50),
        ("photo3.jpg", photo_factory.make_fake_pdf()),
        ("bomb.png", photo_factory.make_decompression_bomb()),
        ("half.jpg", photo_factory.make_truncated_jpeg(51)),
        ("moving.webp", photo_factory.make_animation("WEBP", seed=52)),
        ("twin.jpg", photo_factory.make_photo(50)),
    ]
    error = rejected(db_session, storage, settings, owner, replace(DOG, name=""), files)
    assert list(error.problems.fields) == ["name"]  # field problems come together with the file problems
    reasons = {problem.name: problem.reason for problem in error.problems.files}
    assert set(reasons) == {"photo3.jpg", "bomb.png", "half.jpg", "moving.webp", "twin.jpg"}
    assert reasons["photo3.jpg"].startswith("not an image we can read (PDF?)")
    assert "photo1.jpg" in reasons["twin.jpg"]
    assert count(db_session, Subject) == count(db_session, Photo) == count(db_session, Job) == 0
    assert storage.list("") == []


def test_too_few_photos_are_refused(
    db_session: Session, storage: LocalStorage, settings: Settings, owner: User
) -> None:
    error = rejected(db_session, storage, settings, owner, DOG, photo_factory.make_photos(2))
    assert "at least 3 photos" in error.problems.fields["photos"]
    assert not error.too_large


def test_too_many_photos_are_refused_as_too_large_without_decoding(
    db_session: Session, storage: LocalStorage, settings: Settings, owner: User
) -> None:
    files = [(f"p{index}.jpg", b"not even decoded") for index in range(21)]
    error = rejected(db_session, storage, settings, owner, DOG, files)
    assert error.too_large
    assert error.problems.fields["photos"] == "Upload at most 20 photos (you sent 21)."
    assert error.problems.files == []


def test_active_job_limit(
    db_session: Session,
    storage: LocalStorage,
    settings: Settings,
    owner: User,
    valid_photos: list[tuple[str, bytes]],
) -> None:
    for _ in range(settings.max_active_jobs_per_user):
        subject = factories.make_subject(db_session, owner)
        db_session.add(Job(subject_id=subject.id, owner_id=owner.id, status="running"))
    done = factories.make_subject(db_session, owner)
    db_session.add(Job(subject_id=done.id, owner_id=owner.id, status="done"))  # finished jobs do not count
    db_session.flush()
    with pytest.raises(TooManyActiveJobs) as caught:
        create_studio(db_session, storage, settings, owner, DOG, valid_photos)
    assert caught.value.retry_after > 0
    assert str(caught.value) == (
        "You already have 2 studios in training. Start a new one when one of them has finished."
    )
    other = factories.make_user(db_session, "other@example.com")  # the limit is per account
    create_studio(db_session, storage, settings, other, DOG, valid_photos)


def test_studios_per_hour_limit(
    db_session: Session,
    storage: LocalStorage,
    settings: Settings,
    owner: User,
    valid_photos: list[tuple[str, bytes]],
) -> None:
    hourly = settings.model_copy(update={"max_studios_per_hour": 2, "max_active_jobs_per_user": 10})
    first, _ = create_studio(db_session, storage, hourly, owner, DOG, valid_photos)
    create_studio(db_session, storage, hourly, owner, DOG, valid_photos)
    db_session.delete(first)  # deleting a studio does not give its place back
    db_session.flush()
    with pytest.raises(TooManyStudiosThisHour) as caught:
        create_studio(db_session, storage, hourly, owner, DOG, valid_photos)
    assert 3500 < caught.value.retry_after <= 3600
    assert str(caught.value) == (
        "You have created 2 studios in the last hour, the most this studio allows. "
        "You can start the next one in about 1 h."
    )
    other = factories.make_user(db_session, "other@example.com")  # the limit is per account
    create_studio(db_session, storage, hourly, other, DOG, valid_photos)
    unlimited = hourly.model_copy(update={"max_studios_per_hour": 0})
    create_studio(db_session, storage, unlimited, owner, DOG, valid_photos)


def test_photos_are_deleted_when_the_transaction_rolls_back(
    db_session: Session,
    storage: LocalStorage,
    settings: Settings,
    owner: User,
    valid_photos: list[tuple[str, bytes]],
    sent_tasks: list[SentTask],
) -> None:
    create_studio(db_session, storage, settings, owner, DOG, valid_photos)
    assert len(storage.list("users/")) == 3
    db_session.rollback()  # e.g. the request failed after the service returned
    assert storage.list("users/") == []
    assert sent_tasks == []


def test_photos_are_kept_once_committed(
    db_session: Session,
    storage: LocalStorage,
    settings: Settings,
    owner: User,
    valid_photos: list[tuple[str, bytes]],
    sent_tasks: list[SentTask],
) -> None:
    create_studio(db_session, storage, settings, owner, DOG, valid_photos)
    db_session.commit()
    db_session.rollback()  # a later, unrelated rollback must not touch committed photos
    assert len(storage.list("users/")) == 3


def test_photos_are_deleted_when_storing_fails_half_way(
    db_session: Session,
    storage: LocalStorage,
    settings: Settings,
    owner: User,
    valid_photos: list[tuple[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original_put = storage.put_bytes
    calls = []

    def failing_put(key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        calls.append(key)
        if len(calls) == 3:
            raise OSError("disk full")
        original_put(key, data, content_type)

    monkeypatch.setattr(storage, "put_bytes", failing_put)
    with pytest.raises(OSError, match="disk full"):
        create_studio(db_session, storage, settings, owner, DOG, valid_photos)
    assert storage.list("users/") == []


def test_studio_cards_show_status_and_thumbnail_of_the_owner_only(
    db_session: Session, storage: LocalStorage, owner: User
) -> None:
    older = factories.make_subject(db_session, owner, name="Older", created_at=utcnow() - timedelta(days=1))
    db_session.add(Job(subject_id=older.id, owner_id=owner.id, status="done", created_at=utcnow() - timedelta(days=1)))
    newer = factories.make_subject(db_session, owner, name="Newer")
    second = factories.make_photo(db_session, storage, newer, position=1)
    first = factories.make_photo(db_session, storage, newer, position=0)
    assert second.position == 1
    db_session.add(
        Job(subject_id=newer.id, owner_id=owner.id, status="failed", created_at=utcnow() - timedelta(hours=1))
    )
    db_session.add(Job(subject_id=newer.id, owner_id=owner.id, status="running"))
    stranger = factories.make_user(db_session)
    factories.make_subject(db_session, stranger, name="Not mine")
    db_session.flush()

    cards = studio_cards(db_session, owner)
    assert [(card.subject.name, card.status) for card in cards] == [("Newer", "running"), ("Older", "done")]
    assert cards[0].thumbnail is not None and cards[0].thumbnail.id == first.id
    assert cards[1].thumbnail is None


def test_studio_on_s3_storage_stores_photos_in_the_bucket_and_removes_them_on_rollback(
    db_session: Session,
    s3_storage: Any,
    settings: Settings,
    owner: User,
    valid_photos: list[tuple[str, bytes]],
    sent_tasks: list[SentTask],
) -> None:
    subject, _ = create_studio(db_session, s3_storage, settings, owner, DOG, valid_photos)
    keys = s3_storage.list(f"users/{owner.id}/subjects/{subject.id}/photos/")
    assert len(keys) == 3
    assert Image.open(io.BytesIO(s3_storage.get_bytes(keys[0]))).format == "JPEG"
    db_session.rollback()
    assert s3_storage.list("users/") == []


def test_a_studio_without_its_photos_shows_its_best_picture(
    db_session: Session, storage: LocalStorage, owner: User
) -> None:
    finished = factories.make_subject(db_session, owner, photos_deleted_at=utcnow())
    job = factories.make_job(db_session, finished, status="done", stage="finished")
    factories.make_image(db_session, storage, finished, job, seed=1, rank=2)
    best = factories.make_image(db_session, storage, finished, job, "a photo of {subject} in the snow", seed=2, rank=1)
    unscored = factories.make_subject(db_session, owner, photos_deleted_at=utcnow())
    first = factories.make_image(db_session, storage, unscored, factories.make_job(db_session, unscored), seed=3)
    with_photos = factories.make_subject(db_session, owner)
    photo = factories.make_photo(db_session, storage, with_photos)
    db_session.flush()
    cards = {card.subject.id: card for card in studio_cards(db_session, owner)}
    assert cards[finished.id].thumbnail is None and cards[finished.id].cover_image is best
    assert cards[unscored.id].cover_image is first
    assert cards[with_photos.id].thumbnail is photo and cards[with_photos.id].cover_image is None
