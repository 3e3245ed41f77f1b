"""Gallery pages: the grid, the full view, downloads, favourites, generate more, ZIP and delete (template + context)."""

from __future__ import annotations

import io
import uuid
import zipfile
from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import GeneratedImage, GenerationRequest, Job, Photo, Subject, User, utcnow
from app.storage import Storage
from tests.app.factories import make_image, make_job, make_photo, make_subject, png_bytes
from tests.app.galleries.conftest import SentTasks

Login = Callable[..., TestClient]
Csrf = Callable[[TestClient], str]
Studio = tuple[User, Subject, list[GeneratedImage]]


@pytest.fixture
def studio(db: Session, app_storage: Storage, make_user: Callable[..., User]) -> Studio:
    """A trained studio with two prompts: three beach pictures (ranked) and one in the snow."""
    user = make_user()
    subject = make_subject(db, user, weights_key="w", identifier="qzx")
    job = make_job(db, subject, status="done", stage="finished")
    start = utcnow()
    images = [
        make_image(db, app_storage, subject, job, seed=seed, rank=rank, dino=0.5, created_at=start)
        for seed, rank in ((0, 3), (1, 1), (2, 4))
    ]
    images.append(make_image(db, app_storage, subject, job, "a photo of {subject} in the snow", seed=0, rank=2,
                             created_at=start + timedelta(seconds=1)))
    db.commit()
    return user, subject, images


def test_gallery_groups_by_prompt_and_sorts_by_likeness(
    client: TestClient, login: Login, studio: Studio
) -> None:
    user, subject, images = studio
    login(client, user)
    response = client.get(f"/studios/{subject.id}/gallery")
    assert response.status_code == 200
    assert response.template.name == "galleries/gallery.html"  # type: ignore[attr-defined]
    context = response.context  # type: ignore[attr-defined]
    assert context["sort"] == "likeness"  # scored images default to best likeness first
    # Best likeness first across every prompt (rank 2 is the snow picture), not inside each prompt's group.
    groups = context["groups"]
    assert [group.readable for group in groups] == ["Best likeness first"]
    ranked = [images[1].id, images[3].id, images[0].id, images[2].id]
    assert [image.id for image in context["images"]] == ranked
    assert context["captions"][images[3].id] == "a photo of Rex in the snow"
    assert context["total_count"] == 4
    assert context["can_generate"] is True
    assert '<span class="subject-chip">Rex</span>' in response.text
    assert f"/studios/{subject.id}/images/{images[1].id}/file" in response.text
    assert f"/studios/{subject.id}/download.zip" in response.text

    chronological = client.get(f"/studios/{subject.id}/gallery?sort=created").context  # type: ignore[attr-defined]
    assert [group.readable for group in chronological["groups"]] == [
        "a photo of Rex on the beach", "a photo of Rex in the snow"]
    assert [image.id for image in chronological["groups"][0].images] == [images[0].id, images[1].id, images[2].id]

    # The image page walks the same order as the gallery (and its lightbox), with or without a sort asked for.
    for query, order in (("", ranked), ("?sort=likeness", ranked),
                         ("?sort=created", [images[0].id, images[1].id, images[2].id, images[3].id])):
        walked: list[uuid.UUID] = []
        current: uuid.UUID | None = order[0]
        while current is not None:
            walked.append(current)
            page = client.get(f"/studios/{subject.id}/images/{current}{query}").context  # type: ignore[attr-defined]
            current = page["next"].id if page["next"] is not None else None
        assert walked == order, query


def test_favourite_form_and_filter(client: TestClient, login: Login, csrf_token: Csrf,
                                  studio: Studio) -> None:
    user, subject, images = studio
    login(client, user)
    url = f"/studios/{subject.id}/images/{images[2].id}/favourite"
    back = f"/studios/{subject.id}/gallery?sort=created"
    response = client.post(url, data={"favourite": "true", "return_to": back, "csrf_token": csrf_token(client)},
                           follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == back

    context = client.get(f"/studios/{subject.id}/gallery?favourites=1").context  # type: ignore[attr-defined]
    assert [image.id for image in context["images"]] == [images[2].id]
    assert context["favourite_count"] == 1

    # A return_to outside this studio falls back to the gallery: no open redirect.
    response = client.post(url, data={"favourite": "false", "return_to": "https://evil.example/",
                                      "csrf_token": csrf_token(client)}, follow_redirects=False)
    assert response.headers["location"] == f"/studios/{subject.id}/gallery"
    assert client.post(url, data={"favourite": "true"}).status_code == 403


def test_image_page_is_the_no_script_full_view(client: TestClient, login: Login,
                                               studio: Studio) -> None:
    user, subject, images = studio
    login(client, user)
    response = client.get(f"/studios/{subject.id}/images/{images[1].id}?sort=created")
    assert response.template.name == "galleries/image.html"  # type: ignore[attr-defined]
    context = response.context  # type: ignore[attr-defined]
    assert context["previous"].id == images[0].id
    assert context["next"].id == images[2].id
    assert context["filename"] == "rex-on-the-beach-2.png"
    assert context["readable_prompt"] == "a photo of Rex on the beach"


def test_image_file_and_download(client: TestClient, login: Login,
                                 studio: Studio) -> None:
    user, subject, images = studio
    login(client, user)
    file = client.get(f"/studios/{subject.id}/images/{images[2].id}/file")
    assert file.content == png_bytes(2)
    assert file.headers["content-type"] == "image/png"
    download = client.get(f"/studios/{subject.id}/images/{images[2].id}/download")
    assert download.headers["content-disposition"].startswith('attachment; filename="rex-on-the-beach-3.png"')
    snow = client.get(f"/studios/{subject.id}/images/{images[3].id}/download")
    assert 'filename="rex-in-the-snow-1.png"' in snow.headers["content-disposition"]


def test_image_of_another_studio_of_the_same_account_is_404(
    client: TestClient, db: Session, login: Login, studio: Studio
) -> None:
    user, subject, images = studio
    other = make_subject(db, user, name="Tom")
    db.commit()
    login(client, user)
    assert client.get(f"/studios/{other.id}/images/{images[0].id}").status_code == 404
    assert client.get(f"/studios/{other.id}/images/{images[0].id}/file").status_code == 404


def test_generate_more_form(client: TestClient, db: Session, login: Login, csrf_token: Csrf,
                            studio: Studio,
                            sent_tasks: SentTasks) -> None:
    user, subject, _ = studio
    login(client, user)
    response = client.post(
        f"/studios/{subject.id}/generate",
        data={"prompts": "a photo of {subject} in space\non a skateboard\n", "images_per_prompt": "2",
              "csrf_token": csrf_token(client)},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/studios/{subject.id}"
    job = db.scalars(select(Job).where(Job.kind == "generate")).one()
    request = db.scalars(select(GenerationRequest).where(GenerationRequest.job_id == job.id)).one()
    assert request.prompts == ["a photo of {subject} in space", "a photo of {subject}, on a skateboard"]
    assert sent_tasks == [("generation.run", {"job_id": str(job.id)})]

    # While that job is queued the studio refuses another one and says why.
    again = client.post(f"/studios/{subject.id}/generate",
                        data={"prompts": "in the rain", "images_per_prompt": "1", "csrf_token": csrf_token(client)})
    assert again.status_code == 409
    assert again.template.name == "galleries/gallery.html"  # type: ignore[attr-defined]
    assert "in progress" in again.context["generate_error"]  # type: ignore[attr-defined]
    assert again.context["generate_form"]["prompts"] == "in the rain"  # type: ignore[attr-defined]
    assert len(sent_tasks) == 1


def test_zip_from_the_page(client: TestClient, login: Login, studio: Studio) -> None:
    user, subject, _ = studio
    login(client, user)
    response = client.get(f"/studios/{subject.id}/download.zip")
    assert response.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert sorted(names) == ["manifest.json", "rex-in-the-snow/1.png", "rex-on-the-beach/1.png",
                             "rex-on-the-beach/2.png", "rex-on-the-beach/3.png"]


def test_delete_after_confirmation_removes_everything(
    client: TestClient, db: Session, app_storage: Storage, login: Login, csrf_token: Csrf,
    studio: Studio, sent_tasks: SentTasks,
) -> None:
    user, subject, images = studio
    photo = make_photo(db, app_storage, subject)
    db.commit()
    login(client, user)

    confirm = client.get(f"/studios/{subject.id}/delete")
    assert confirm.template.name == "galleries/delete.html"  # type: ignore[attr-defined]
    assert confirm.context["image_count"] == 4  # type: ignore[attr-defined]
    assert confirm.context["photo_count"] == 1  # type: ignore[attr-defined]
    assert confirm.context["has_model"] is True  # type: ignore[attr-defined]
    assert app_storage.list(f"users/{user.id}/")  # nothing is removed by looking at the page

    assert client.post(f"/studios/{subject.id}/delete", data={}).status_code == 403
    response = client.post(f"/studios/{subject.id}/delete", data={"csrf_token": csrf_token(client)},
                           follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/studios"

    db.expunge_all()
    assert db.get(Subject, subject.id) is None
    assert db.scalars(select(GeneratedImage).where(GeneratedImage.subject_id == subject.id)).all() == []
    assert db.scalars(select(Photo).where(Photo.id == photo.id)).all() == []
    assert db.scalars(select(Job).where(Job.subject_id == subject.id)).all() == []
    assert app_storage.list(f"users/{user.id}/") == []
    assert [name for name, _ in sent_tasks] == ["maintenance.purge_subject"]
    assert client.get(f"/studios/{subject.id}/gallery").status_code == 404
    assert client.get(f"/studios/{subject.id}/images/{images[0].id}/file").status_code == 404


def test_generate_more_form_at_the_account_limit_says_when_to_come_back(
    client: TestClient, db: Session, login: Login, csrf_token: Csrf, studio: Studio, sent_tasks: SentTasks,
) -> None:
    user, subject, _ = studio
    for name in ("Tom", "Kit"):
        make_job(db, make_subject(db, user, name=name))
    db.commit()
    login(client, user)
    response = client.post(f"/studios/{subject.id}/generate",
                           data={"prompts": "in the rain", "images_per_prompt": "1", "csrf_token": csrf_token(client)})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "60"
    assert "2 jobs in progress" in response.context["generate_error"]  # type: ignore[attr-defined]
    assert sent_tasks == []


def test_a_person_studio_ranks_by_face_match_and_says_it_in_words(
    client: TestClient, login: Login, db: Session, app_storage: Storage, make_user: Callable[..., User],
    api_headers: Callable[[User], dict[str, str]],
) -> None:
    user = make_user()
    subject = make_subject(db, user, kind="person", class_noun="woman", weights_key="w", identifier="qzx")
    job = make_job(db, subject, status="done", stage="finished")
    start = utcnow()
    # DINO's rank says otherwise: for a person the face decides, and a picture with no face comes last.
    faces = [(None, 1), (0.55, 2), (0.31, 4), (0.72, 3)]
    images = [make_image(db, app_storage, subject, job, seed=seed, rank=rank, face_distance=distance,
                         face_checked=True, created_at=start) for seed, (distance, rank) in enumerate(faces)]
    db.commit()
    login(client, user)
    response = client.get(f"/studios/{subject.id}/gallery")
    context = response.context  # type: ignore[attr-defined]
    assert context["sort"] == "likeness"
    assert [image.id for image in context["groups"][0].images] == [images[i].id for i in (2, 1, 3, 0)]
    for words in ("Strong match", "Weak match", "Not a match", "No face found"):
        assert f">{words}</span>" in response.text
    full = client.get(f"/studios/{subject.id}/images/{images[2].id}")
    assert "Strong match (0.31 from your photos" in full.text

    listed = client.get(f"/api/v1/subjects/{subject.id}/images?sort=likeness", headers=api_headers(user)).json()
    rows = listed["images"] if isinstance(listed, dict) else listed
    assert [(row["scores"]["face_distance"], row["face_match"]) for row in rows] == [
        (0.31, "strong match"), (0.55, "weak match"), (0.72, "not a match"), (None, "no face found")]
