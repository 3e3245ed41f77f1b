"""The gallery API: images, files, favourites, generate more, the ZIP, delete."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import GeneratedImage, GenerationRequest, Job, Subject, User
from app.storage import Storage
from tests.app.factories import make_image, make_job, make_subject, png_bytes
from tests.app.galleries.conftest import SentTasks

Headers = Callable[[User], dict[str, str]]


def test_list_images_flat_and_grouped(client: TestClient, db: Session, app_storage: Storage,
                                      make_user: Callable[..., User], api_headers: Headers) -> None:
    user = make_user()
    subject = make_subject(db, user)
    job = make_job(db, subject, status="done", stage="finished")
    beach = make_image(db, app_storage, subject, job, seed=1, rank=2, dino=0.7)
    snow = make_image(db, app_storage, subject, job, "a photo of {subject} in the snow", seed=2, rank=1)
    db.commit()
    headers = api_headers(user)

    body = client.get(f"/api/v1/subjects/{subject.id}/images", headers=headers).json()
    assert body["count"] == 2
    assert body["groups"] is None
    first = body["images"][0]
    assert first["id"] == str(beach.id)
    assert first["scores"] == {"dino": 0.7, "clip_i": None, "clip_t": None, "face_distance": None}
    assert first["face_match"] is None  # a dog: no face checked
    assert first["file_url"] == f"/api/v1/images/{beach.id}/file"

    grouped = client.get(f"/api/v1/subjects/{subject.id}/images?grouped=true&sort=likeness", headers=headers).json()
    assert [image["id"] for image in grouped["images"]] == [str(snow.id), str(beach.id)]
    assert [group["readable_prompt"] for group in grouped["groups"]] == [
        "a photo of Rex on the beach", "a photo of Rex in the snow"
    ]


def test_image_detail_file_and_download(client: TestClient, db: Session, app_storage: Storage,
                                        make_user: Callable[..., User], api_headers: Headers) -> None:
    user = make_user()
    subject = make_subject(db, user)
    job = make_job(db, subject)
    image = make_image(db, app_storage, subject, job, seed=4)
    db.commit()
    headers = api_headers(user)

    assert client.get(f"/api/v1/images/{image.id}", headers=headers).json()["seed"] == 4
    inline = client.get(f"/api/v1/images/{image.id}/file", headers=headers)
    assert inline.status_code == 200
    assert inline.content == png_bytes(4)
    assert inline.headers["content-disposition"].startswith('inline; filename="rex-on-the-beach.png"')
    attachment = client.get(f"/api/v1/images/{image.id}/file?download=true", headers=headers)
    assert attachment.headers["content-disposition"].startswith('attachment; filename="rex-on-the-beach-1.png"')


def test_file_routes_redirect_to_signed_urls_when_the_backend_has_them(
    client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User], api_headers: Headers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = make_user()
    subject = make_subject(db, user)
    image = make_image(db, app_storage, subject, make_job(db, subject))
    db.commit()
    monkeypatch.setattr(app_storage, "presigned_url", lambda key, seconds, filename=None: f"https://bucket/{key}?sig")
    response = client.get(f"/api/v1/images/{image.id}/file", headers=api_headers(user), follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == f"https://bucket/{image.storage_key}?sig"


def test_missing_file_is_a_404(client: TestClient, db: Session, app_storage: Storage,
                               make_user: Callable[..., User], api_headers: Headers) -> None:
    user = make_user()
    subject = make_subject(db, user)
    image = make_image(db, app_storage, subject, make_job(db, subject))
    db.commit()
    app_storage.delete(image.storage_key)
    assert client.get(f"/api/v1/images/{image.id}/file", headers=api_headers(user)).status_code == 404


def test_favourite_through_patch(client: TestClient, db: Session, app_storage: Storage,
                                 make_user: Callable[..., User], api_headers: Headers) -> None:
    user = make_user()
    subject = make_subject(db, user)
    image = make_image(db, app_storage, subject, make_job(db, subject))
    db.commit()
    headers = api_headers(user)
    response = client.patch(f"/api/v1/images/{image.id}", json={"favourite": True}, headers=headers)
    assert response.status_code == 200
    assert response.json()["favourite"] is True
    listed = client.get(f"/api/v1/subjects/{subject.id}/images?favourites=true", headers=headers).json()
    assert [item["id"] for item in listed["images"]] == [str(image.id)]
    assert client.patch(f"/api/v1/images/{image.id}", json={"favourite": "maybe"}, headers=headers).status_code == 422
    # The schema says boolean: 0 and "false" are not quietly taken for one.
    for not_a_boolean in (0, "false"):
        answer = client.patch(f"/api/v1/images/{image.id}", json={"favourite": not_a_boolean}, headers=headers)
        assert answer.status_code == 422
    assert client.get(f"/api/v1/images/{image.id}", headers=headers).json()["favourite"] is True


def test_generate_more_through_the_api(client: TestClient, db: Session, make_user: Callable[..., User],
                                       api_headers: Headers, sent_tasks: SentTasks) -> None:
    user = make_user()
    subject = make_subject(db, user, weights_key="users/x/weights/lora.safetensors")
    make_job(db, subject, status="done", stage="finished")
    db.commit()
    headers = api_headers(user)

    response = client.post(f"/api/v1/subjects/{subject.id}/generate",
                           json={"prompts": ["a photo of {subject} in space"], "images_per_prompt": 2}, headers=headers)
    assert response.status_code == 202
    job = response.json()["job"]
    assert (job["kind"], job["status"], job["queue_position"]) == ("generate", "queued", 1)
    assert sent_tasks == [("generation.run", {"job_id": job["id"]})]

    busy = client.post(f"/api/v1/subjects/{subject.id}/generate", json={"prompts": ["x"]}, headers=headers)
    assert busy.status_code == 409
    assert "in progress" in busy.json()["detail"]
    assert len(sent_tasks) == 1


def test_generate_more_refuses_an_untrained_studio_and_bad_input(
    client: TestClient, db: Session, make_user: Callable[..., User], api_headers: Headers,
    sent_tasks: SentTasks,
) -> None:
    user = make_user()
    untrained = make_subject(db, user)
    trained = make_subject(db, user, weights_key="w")
    db.commit()
    headers = api_headers(user)
    url = f"/api/v1/subjects/{untrained.id}/generate"
    assert client.post(url, json={"prompts": ["in the snow"]}, headers=headers).status_code == 409
    url = f"/api/v1/subjects/{trained.id}/generate"
    # No prompt at all answers the same sentence as blank prompts, not a list of validation errors.
    for prompts in ([], ["   "]):
        refused = client.post(url, json={"prompts": prompts}, headers=headers)
        assert refused.status_code == 422
        assert refused.json() == {"detail": "Write at least one prompt, for example: a photo of {subject} in the snow."}
    assert client.post(url, json={"prompts": ["a"], "images_per_prompt": 99}, headers=headers).status_code == 422
    assert sent_tasks == []
    assert db.scalars(select(Job)).all() == []


def test_zip_download_streams_the_gallery(client: TestClient, db: Session, app_storage: Storage,
                                          make_user: Callable[..., User], api_headers: Headers) -> None:
    user = make_user()
    subject = make_subject(db, user)
    job = make_job(db, subject)
    for seed in range(3):
        make_image(db, app_storage, subject, job, seed=seed, favourite=seed == 0)
    db.commit()

    with client.stream("GET", f"/api/v1/subjects/{subject.id}/download.zip", headers=api_headers(user)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/zip"
        assert "content-length" not in response.headers  # streamed, not built first
        assert 'filename="rex-gallery.zip"' in response.headers["content-disposition"]
        data = response.read()
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert sorted(archive.namelist()) == ["manifest.json"] + [f"rex-on-the-beach/{n}.png" for n in (1, 2, 3)]
    assert len(json.loads(archive.read("manifest.json"))["images"]) == 3

    favourites = client.get(f"/api/v1/subjects/{subject.id}/download.zip?favourites=true", headers=api_headers(user))
    assert zipfile.ZipFile(io.BytesIO(favourites.content)).namelist() == ["rex-on-the-beach/1.png", "manifest.json"]


def test_delete_through_the_api_removes_everything(
    client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User], api_headers: Headers,
    sent_tasks: SentTasks,
) -> None:
    user = make_user()
    subject = make_subject(db, user)
    image = make_image(db, app_storage, subject, make_job(db, subject, status="done", stage="finished"))
    db.commit()
    response = client.delete(f"/api/v1/subjects/{subject.id}", headers=api_headers(user))
    assert response.status_code == 204
    db.expunge_all()
    assert db.scalars(select(GeneratedImage).where(GeneratedImage.id == image.id)).first() is None
    assert db.get(Subject, subject.id) is None
    assert app_storage.list(f"users/{user.id}/") == []
    assert [name for name, _ in sent_tasks] == ["maintenance.purge_subject"]
    assert client.get(f"/api/v1/subjects/{subject.id}/images", headers=api_headers(user)).status_code == 404


def test_generate_more_on_the_demo_model_says_so_from_the_start(
    client: TestClient, db: Session, make_user: Callable[..., User], api_headers: Headers, sent_tasks: SentTasks,
) -> None:
    user = make_user()
    subject = make_subject(db, user, weights_key="w", base_model="tiny", model_info={"demo_model": True})
    db.commit()
    response = client.post(f"/api/v1/subjects/{subject.id}/generate", json={"prompts": ["in the snow"]},
                           headers=api_headers(user))
    assert response.status_code == 202
    assert response.json()["job"]["demo_model"] is True


def test_more_like_this_and_delete_one_picture(
    client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User], api_headers: Headers,
    sent_tasks: SentTasks,
) -> None:
    user = make_user()
    subject = make_subject(db, user, weights_key="w")
    job = make_job(db, subject, status="done", stage="finished")
    keep = make_image(db, app_storage, subject, job, "a photo of {subject} in the snow", seed=1, rank=1)
    gone = make_image(db, app_storage, subject, job, "a photo of {subject} on the beach", seed=2, rank=2)
    db.commit()
    headers = api_headers(user)

    more = client.post(f"/api/v1/images/{gone.id}/more", headers=headers)
    assert more.status_code == 202
    new_job = db.get(Job, uuid.UUID(more.json()["job"]["id"]))
    assert new_job is not None and new_job.kind == "generate"
    request = db.scalars(select(GenerationRequest).where(GenerationRequest.job_id == new_job.id)).one()
    assert request.prompts == ["a photo of {subject} on the beach"]
    assert sent_tasks == [("generation.run", {"job_id": str(new_job.id)})]
    assert client.post(f"/api/v1/images/{keep.id}/more", headers=headers).status_code == 409  # one job at a time

    key, gone_id = gone.storage_key, gone.id
    assert client.delete(f"/api/v1/images/{gone_id}", headers=headers).status_code == 204
    db.expire_all()
    assert db.get(GeneratedImage, gone_id) is None and not app_storage.exists(key)
    assert client.get(f"/api/v1/images/{gone_id}", headers=headers).status_code == 404
    assert client.delete(f"/api/v1/images/{gone_id}", headers=headers).status_code == 404
    listed = client.get(f"/api/v1/subjects/{subject.id}/images", headers=headers).json()
    assert [image["id"] for image in listed["images"]] == [str(keep.id)]
    # Another account cannot delete it, nor learn that it exists.
    stranger = api_headers(make_user("stranger@example.com"))
    assert client.delete(f"/api/v1/images/{keep.id}", headers=stranger).status_code == 404
    assert client.post(f"/api/v1/images/{keep.id}/more", headers=stranger).status_code == 404


def test_rename_through_the_api(client: TestClient, db: Session, make_user: Callable[..., User],
                                api_headers: Headers) -> None:
    user = make_user()
    subject = make_subject(db, user)
    db.commit()
    url = f"/api/v1/subjects/{subject.id}"
    renamed = client.patch(url, json={"name": " Biscuit "}, headers=api_headers(user))
    assert renamed.status_code == 200 and renamed.json()["name"] == "Biscuit"
    for name in ("", "   ", "x" * 101):
        refused = client.patch(url, json={"name": name}, headers=api_headers(user))
        assert refused.status_code == 422
        assert refused.json() == {"detail": "Give the studio a name of 1 to 100 characters, like “Rex”."}


def test_generate_more_in_a_shape(client: TestClient, db: Session, make_user: Callable[..., User],
                                  api_headers: Headers, sent_tasks: SentTasks) -> None:
    user = make_user()
    subject = make_subject(db, user, weights_key="w")
    db.commit()
    response = client.post(f"/api/v1/subjects/{subject.id}/generate", headers=api_headers(user), json={
        "prompts": ["on a sofa", "a photo of {subject} in the snow (landscape)"], "shape": "portrait"})
    assert response.status_code == 202
    request = db.scalars(select(GenerationRequest)).one()
    # The chosen shape for each prompt; a prompt that names its own keeps it.
    assert request.prompts == ["a photo of {subject}, on a sofa (portrait)",
                               "a photo of {subject} in the snow (landscape)"]
