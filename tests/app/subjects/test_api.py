"""The studio JSON API: multipart creation with every kind of refusal, listing, detail, photos, style packs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import sessionmaker

from app.config import Settings
from app.main import create_app
from app.models import Job, Photo, Subject, User, utcnow
from app.storage import Storage
from tests import face_photos
from tests.app import factories, photo_factory
from tests.app.subjects.conftest import SentTask

FIELDS = {"name": "Rex", "kind": "dog", "consent": "yes"}


def upload(photos: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    # Content types deliberately say nothing true: the server decides by decoding.
    return [("photos", (name, data, "application/octet-stream")) for name, data in photos]


def counts(engine: Engine) -> tuple[int, int, int]:
    with sessionmaker(bind=engine)() as session:
        return tuple(  # type: ignore[return-value]
            session.scalar(select(func.count()).select_from(model)) or 0 for model in (Subject, Photo, Job)
        )


def stored_files(storage: Storage) -> list[str]:
    return storage.list("users/")


@pytest.fixture
def owner(make_user: Callable[..., User]) -> User:
    return make_user("owner@example.com")


@pytest.fixture
def headers(owner: User, api_headers: Callable[[User], dict[str, str]]) -> dict[str, str]:
    return api_headers(owner)


@pytest.fixture
def app_storage(client: TestClient) -> Storage:
    storage: Storage = client.app.state.storage  # type: ignore[attr-defined]
    return storage


def test_create_studio_returns_201_with_subject_and_job_and_enqueues_training(
    client: TestClient,
    headers: dict[str, str],
    valid_photos: list[tuple[str, bytes]],
    sent_tasks: list[SentTask],
    app_storage: Storage,
    clean_db: Engine,
) -> None:
    data: dict[str, Any] = {
        **FIELDS,
        "style_pack": "pet-dress-up",
        "prompts": ["on a skateboard\n\n{subject} in space", "  at the beach  "],
        "images_per_prompt": "2",
        "quality": "best",
    }
    response = client.post("/api/v1/subjects", data=data, files=upload(valid_photos), headers=headers)
    assert response.status_code == 201, response.text
    body = response.json()
    subject, job = body["subject"], body["job"]
    assert response.headers["location"] == f"/api/v1/subjects/{subject['id']}"
    assert subject["name"] == "Rex" and subject["kind"] == "dog" and subject["class_noun"] == "dog"
    assert subject["style_pack"] == "pet-dress-up"
    assert subject["prompts"] == [
        "a photo of {subject}, on a skateboard",
        "{subject} in space",
        "a photo of {subject}, at the beach",
    ]
    assert (subject["images_per_prompt"], subject["quality"], subject["status"]) == (2, "best", "queued")
    assert subject["page_url"] == f"/studios/{subject['id']}"
    assert [photo["original_name"] for photo in subject["photos"]] == ["photo1.jpg", "photo2.jpg", "photo3.jpg"]
    assert subject["counts"] == {"photos": 3, "images": 0, "jobs": 1}
    assert subject["thumbnail_url"] == subject["photos"][0]["url"]
    assert job["status"] == "queued" and job["kind"] == "train" and job["url"] == f"/api/v1/jobs/{job['id']}"
    assert subject["latest_job"]["id"] == job["id"]
    assert [(task.name, task.kwargs) for task in sent_tasks] == [("training.run", {"job_id": job["id"]})]
    assert counts(clean_db) == (1, 3, 1)
    assert len(stored_files(app_storage)) == 3


def test_person_with_class_noun(
    client: TestClient, headers: dict[str, str], person_photos: list[tuple[str, bytes]], sent_tasks: list[SentTask]
) -> None:
    data = {"name": "Me", "kind": "person", "class_noun": "woman", "consent": "on"}
    response = client.post("/api/v1/subjects", data=data, files=upload(person_photos), headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["subject"]["class_noun"] == "woman"
    assert response.json()["subject"]["style_pack"] == "portrait-classics"


def test_heic_upload_is_accepted(
    client: TestClient, headers: dict[str, str], sent_tasks: list[SentTask], app_storage: Storage
) -> None:
    photos = [("IMG_0001.HEIC", photo_factory.make_heic(60)), *photo_factory.make_photos(2, start_seed=61)]
    response = client.post("/api/v1/subjects", data=FIELDS, files=upload(photos), headers=headers)
    assert response.status_code == 201, response.text
    heic = response.json()["subject"]["photos"][0]
    assert heic["original_name"] == "IMG_0001.HEIC"
    assert client.get(heic["url"], headers=headers).headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    ("bad_name", "bad_data", "reason_start"),
    [
        ("bomb.png", photo_factory.make_decompression_bomb(), "more pixels than"),
        ("half.jpg", photo_factory.make_truncated_jpeg(70), "incomplete (truncated)"),
        ("photo3.jpg", photo_factory.make_fake_pdf(), "not an image we can read (PDF?)"),
        ("party.gif", photo_factory.make_animation("GIF", seed=71), "not an image we can read (GIF?)"),
        ("moving.png", photo_factory.make_animation("PNG", seed=72), "an animation"),
        ("tiny.jpg", photo_factory.make_photo(73, size=(200, 150)), "too small"),
        ("shaky.jpg", photo_factory.make_blurry_photo(74), "too blurry"),
    ],
)
def test_a_bad_file_is_named_with_its_reason_and_nothing_is_stored(
    client: TestClient,
    headers: dict[str, str],
    app_storage: Storage,
    clean_db: Engine,
    sent_tasks: list[SentTask],
    bad_name: str,
    bad_data: bytes,
    reason_start: str,
) -> None:
    photos = [*photo_factory.make_photos(3, start_seed=75), (bad_name, bad_data)]
    response = client.post("/api/v1/subjects", data=FIELDS, files=upload(photos), headers=headers)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["fields"] == {}
    assert [problem["name"] for problem in body["files"]] == [bad_name]
    assert body["files"][0]["reason"].startswith(reason_start)
    assert "could not be used" in body["detail"]
    assert counts(clean_db) == (0, 0, 0)
    assert stored_files(app_storage) == []
    assert sent_tasks == []


def test_file_over_the_size_limit_is_refused(
    client: TestClient, headers: dict[str, str], settings: Settings, app_storage: Storage
) -> None:
    client.app.state.settings = settings.model_copy(update={"max_photo_bytes": 60_000})  # type: ignore[attr-defined]
    big = photo_factory.make_photo(80, size=(900, 700))
    assert len(big) > 60_000
    photos = [*photo_factory.make_photos(3, start_seed=81, size=(260, 260)), ("IMG_1.jpg", big)]
    response = client.post("/api/v1/subjects", data=FIELDS, files=upload(photos), headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["files"] == [
        {"name": "IMG_1.jpg", "reason": f"{len(big) / 1024 / 1024:.1f} MB is over the 0.1 MB limit"}
    ]
    assert stored_files(app_storage) == []


def test_near_duplicates_are_refused_naming_both(
    client: TestClient, headers: dict[str, str], app_storage: Storage
) -> None:
    photos = [*photo_factory.make_photos(3, start_seed=90), ("copy.jpg", photo_factory.make_photo(90, quality=70))]
    response = client.post("/api/v1/subjects", data=FIELDS, files=upload(photos), headers=headers)
    assert response.status_code == 422, response.text
    [problem] = response.json()["files"]
    assert problem["name"] == "copy.jpg" and "photo1.jpg" in problem["reason"]
    assert stored_files(app_storage) == []


def test_field_problems_come_with_file_problems(client: TestClient, headers: dict[str, str]) -> None:
    photos = [*photo_factory.make_photos(3, start_seed=95), ("notes.jpg", b"just text")]
    data = {"name": "", "kind": "animal", "class_noun": "", "images_per_prompt": "lots", "quality": "ultra"}
    response = client.post("/api/v1/subjects", data=data, files=upload(photos), headers=headers)
    assert response.status_code == 422
    body = response.json()
    assert set(body["fields"]) == {"name", "class_noun", "images_per_prompt", "quality", "consent"}
    assert [problem["name"] for problem in body["files"]] == ["notes.jpg"]
    assert body["detail"] == "Please fix the 6 problems below."


def test_twenty_one_photos_are_too_many(client: TestClient, headers: dict[str, str], app_storage: Storage) -> None:
    photos = [(f"p{index}.jpg", b"x" * 10) for index in range(21)]
    response = client.post("/api/v1/subjects", data=FIELDS, files=upload(photos), headers=headers)
    assert response.status_code == 413
    assert response.json()["fields"]["photos"] == "Upload at most 20 photos (you sent 21)."
    assert stored_files(app_storage) == []


def test_more_files_than_the_parser_accepts_are_refused_while_parsing(
    client: TestClient, headers: dict[str, str]
) -> None:
    photos = [(f"p{index}.jpg", b"x" * 10) for index in range(30)]
    response = client.post("/api/v1/subjects", data=FIELDS, files=upload(photos), headers=headers)
    assert response.status_code == 413, response.text
    assert response.json()["detail"] == "Upload at most 20 photos."


def test_a_body_over_the_request_limit_is_refused(
    client: TestClient, headers: dict[str, str], settings: Settings
) -> None:
    limit = settings.max_request_bytes
    photos = [("huge.jpg", b"\xff\xd8" + b"\x00" * (limit + 10))]
    response = client.post("/api/v1/subjects", data=FIELDS, files=upload(photos), headers=headers)
    assert response.status_code == 413


def test_not_multipart_is_refused(client: TestClient, headers: dict[str, str]) -> None:
    response = client.post("/api/v1/subjects", json=FIELDS, headers=headers)
    assert response.status_code == 415


def test_too_many_active_jobs_is_429_with_retry_after(
    client: TestClient,
    owner: User,
    headers: dict[str, str],
    valid_photos: list[tuple[str, bytes]],
    settings: Settings,
    clean_db: Engine,
) -> None:
    with sessionmaker(bind=clean_db)() as session:
        for _ in range(settings.max_active_jobs_per_user):
            subject = factories.make_subject(session, owner)
            session.add(Job(subject_id=subject.id, owner_id=owner.id, status="queued"))
        session.commit()
    response = client.post("/api/v1/subjects", data=FIELDS, files=upload(valid_photos), headers=headers)
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    assert "in training" in response.json()["detail"]


def test_too_many_studios_in_an_hour_is_429_with_retry_after(
    owner: User,
    headers: dict[str, str],
    valid_photos: list[tuple[str, bytes]],
    settings: Settings,
    clean_db: Engine,
    sent_tasks: list[SentTask],
) -> None:
    one_an_hour = settings.model_copy(update={"max_studios_per_hour": 1})
    with TestClient(create_app(one_an_hour)) as client:
        first = client.post("/api/v1/subjects", data=FIELDS, files=upload(valid_photos), headers=headers)
        assert first.status_code == 201
        again = client.post("/api/v1/subjects", data=FIELDS, files=upload(valid_photos), headers=headers)
    assert again.status_code == 429
    assert 3000 < int(again.headers["retry-after"]) <= 3600
    assert again.json()["detail"].startswith("You have created a studio in the last hour")
    assert len(sent_tasks) == 1


def test_creation_needs_an_account(client: TestClient, valid_photos: list[tuple[str, bytes]]) -> None:
    response = client.post("/api/v1/subjects", data=FIELDS, files=upload(valid_photos))
    assert response.status_code == 401


def test_cookie_requests_need_the_csrf_token(
    client: TestClient,
    owner: User,
    login: Callable[..., TestClient],
    csrf_token: Callable[[TestClient], str],
    valid_photos: list[tuple[str, bytes]],
    sent_tasks: list[SentTask],
) -> None:
    login(client, owner)
    refused = client.post("/api/v1/subjects", data=FIELDS, files=upload(valid_photos))
    assert refused.status_code == 403
    token = csrf_token(client)
    accepted = client.post("/api/v1/subjects", data=FIELDS, files=upload(valid_photos), headers={"X-CSRF-Token": token})
    assert accepted.status_code == 201, accepted.text


def make_owned_subject(engine: Engine, storage: Storage, owner: User, **overrides: Any) -> tuple[Subject, list[Photo]]:
    with sessionmaker(bind=engine, expire_on_commit=False)() as session:
        subject = factories.make_subject(session, owner, **overrides)
        photos = [factories.make_photo(session, storage, subject, position) for position in (1, 0)]
        session.add(Job(subject_id=subject.id, owner_id=owner.id, status="done"))
        session.commit()
    return subject, photos


def test_list_and_detail_are_the_owners_only(
    client: TestClient,
    owner: User,
    headers: dict[str, str],
    make_user: Callable[..., User],
    api_headers: Callable[[User], dict[str, str]],
    app_storage: Storage,
    clean_db: Engine,
) -> None:
    subject, photos = make_owned_subject(clean_db, app_storage, owner)
    listing = client.get("/api/v1/subjects", headers=headers).json()["subjects"]
    assert [(item["id"], item["status"]) for item in listing] == [(str(subject.id), "done")]
    assert listing[0]["thumbnail_url"] == f"/api/v1/subjects/{subject.id}/photos/{photos[1].id}"  # position 0
    assert listing[0]["expires_at"].startswith(subject.expires_at.date().isoformat())

    detail = client.get(f"/api/v1/subjects/{subject.id}", headers=headers).json()
    assert [photo["position"] for photo in detail["photos"]] == [0, 1]
    assert detail["latest_job"]["status"] == "done"

    stranger = api_headers(make_user("stranger@example.com"))
    assert client.get("/api/v1/subjects", headers=stranger).json() == {"subjects": []}
    assert client.get(f"/api/v1/subjects/{subject.id}", headers=stranger).status_code == 404
    photo_url = f"/api/v1/subjects/{subject.id}/photos/{photos[0].id}"
    assert client.get(photo_url, headers=stranger).status_code == 404
    assert client.get(f"/api/v1/subjects/{uuid.uuid4()}", headers=headers).status_code == 404


def test_photo_is_streamed_to_its_owner(
    client: TestClient, owner: User, headers: dict[str, str], app_storage: Storage, clean_db: Engine
) -> None:
    subject, photos = make_owned_subject(clean_db, app_storage, owner)
    response = client.get(f"/api/v1/subjects/{subject.id}/photos/{photos[0].id}", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content == app_storage.get_bytes(photos[0].storage_key)
    app_storage.delete(photos[0].storage_key)
    gone = client.get(f"/api/v1/subjects/{subject.id}/photos/{photos[0].id}", headers=headers)
    assert gone.status_code == 404


def test_photos_deleted_after_training_are_not_listed(
    client: TestClient, owner: User, headers: dict[str, str], app_storage: Storage, clean_db: Engine
) -> None:
    from app.models import utcnow

    subject, _ = make_owned_subject(clean_db, app_storage, owner, photos_deleted_at=utcnow())
    detail = client.get(f"/api/v1/subjects/{subject.id}", headers=headers).json()
    assert detail["photos"] == [] and detail["thumbnail_url"] is None
    assert detail["photos_deleted_at"] is not None


def test_style_packs_are_listed(client: TestClient, headers: dict[str, str]) -> None:
    packs = {pack["name"]: pack for pack in client.get("/api/v1/style-packs", headers=headers).json()}
    assert packs["pet-adventures"]["kind"] == "pet"
    assert packs["portrait-classics"]["kind"] == "person"
    assert all("{subject}" in prompt for pack in packs.values() for prompt in pack["prompts"])


def test_openapi_describes_the_multipart_body(client: TestClient) -> None:
    operation = client.get("/api/v1/openapi.json").json()["paths"]["/api/v1/subjects"]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["properties"]["photos"]["items"]["format"] == "binary"
    assert schema["properties"]["kind"]["enum"] == ["dog", "cat", "animal", "person"]
    assert {"413", "422", "429"} <= set(operation["responses"])


def test_renew_keeps_the_studio_for_another_retention_period(
    client: TestClient, owner: User, headers: dict[str, str], settings: Settings, clean_db: Engine
) -> None:
    with sessionmaker(bind=clean_db)() as session:
        subject = factories.make_subject(session, owner, expires_at=utcnow() + timedelta(days=2))
        session.commit()
        subject_id = subject.id
    response = client.post(f"/api/v1/subjects/{subject_id}/renew", headers=headers)
    assert response.status_code == 200
    expires = datetime.fromisoformat(response.json()["expires_at"])
    expected = utcnow() + timedelta(days=settings.retention_days)
    assert abs((expires - expected).total_seconds()) < 60
    with sessionmaker(bind=clean_db)() as session:
        stored = session.get(Subject, subject_id)
        assert stored is not None and abs((stored.expires_at - expected).total_seconds()) < 60


def test_a_person_studio_names_each_photo_with_a_face_problem_and_stores_nothing(
    client: TestClient, headers: dict[str, str], clean_db: Engine, app_storage: Storage, sent_tasks: list[SentTask]
) -> None:
    hoppers = face_photos.variations(face_photos.hopper())[:3]
    photos = [
        *[(f"me-{index}.jpg", face_photos.jpeg(image)) for index, image in enumerate(hoppers)],
        ("someone-else.jpg", face_photos.jpeg(face_photos.collins())),
        ("my-cat.jpg", face_photos.jpeg(face_photos.cat().resize((451 * 2, 300 * 2)))),
        ("group.jpg", face_photos.jpeg(face_photos.side_by_side(face_photos.hopper(), face_photos.hopper()))),
        ("far-away.jpg", face_photos.jpeg(face_photos.small_face(photo_factory.photo_image(7, (640, 480))))),
        ("again.jpg", face_photos.jpeg(face_photos.same_shot_again(hoppers[0]))),
    ]
    data = {"name": "Me", "kind": "person", "class_noun": "woman", "consent": "on"}
    response = client.post("/api/v1/subjects", data=data, files=upload(photos), headers=headers)
    assert response.status_code == 422, response.text
    reasons = {problem["name"]: problem["reason"] for problem in response.json()["files"]}
    assert set(reasons) == {"someone-else.jpg", "my-cat.jpg", "group.jpg", "far-away.jpg", "again.jpg"}
    assert reasons["someone-else.jpg"].startswith("shows someone else than the other 4 photos")
    assert reasons["my-cat.jpg"].startswith("no face found")
    assert reasons["group.jpg"].startswith("shows 2 faces")
    assert reasons["far-away.jpg"].startswith("the face is too small to learn from")
    assert reasons["again.jpg"] == ("shows the face just as me-0.jpg does (the same shot again); "
                                    "keep one and add a different shot")
    assert counts(clean_db) == (0, 0, 0) and stored_files(app_storage) == [] and sent_tasks == []
    # The very photos a pet's studio takes: its checks are today's.
    pet = client.post("/api/v1/subjects", data=FIELDS, files=upload(photos[3:5] + photos[:1]), headers=headers)
    assert pet.status_code == 201, pet.text
