"""Studio pages, checked by template name and context: my studios, the new-studio form and its post, photos."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import sessionmaker

from app import rate_limits
from app.config import Settings
from app.models import Job, Photo, Subject, User, utcnow
from app.storage import Storage
from app.subjects.service import studios_per_hour
from tests.app import factories, photo_factory
from tests.app.conftest import page_context, page_template
from tests.app.subjects.conftest import SentTask


@pytest.fixture
def owner(make_user: Callable[..., User]) -> User:
    return make_user("owner@example.com")


@pytest.fixture
def signed_in(client: TestClient, owner: User, login: Callable[..., TestClient]) -> TestClient:
    return login(client, owner)


@pytest.fixture
def app_storage(client: TestClient) -> Storage:
    storage: Storage = client.app.state.storage  # type: ignore[attr-defined]
    return storage


def form_fields(client: TestClient, csrf_token: Callable[[TestClient], str], **overrides: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "csrf_token": csrf_token(client),
        "name": "Rex",
        "kind": "dog",
        "class_noun_animal": "",
        "class_noun_person": "person",
        "style_pack": "",
        "prompts": "on a skateboard\n{subject} in space",
        "images_per_prompt": "3",
        "quality": "balanced",
        "consent": "yes",
    }
    fields.update(overrides)
    return fields


def files_of(photos: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("photos", (name, data, "image/jpeg")) for name, data in photos]


def row_count(engine: Engine, model: type) -> int:
    with sessionmaker(bind=engine)() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_pages_need_a_signed_in_user(client: TestClient) -> None:
    for path in ("/studios", "/studios/new", f"/studios/{uuid.uuid4()}/photos/{uuid.uuid4()}"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/login?next=")


def test_my_studios_empty_state(signed_in: TestClient) -> None:
    response = signed_in.get("/studios")
    assert response.status_code == 200
    assert page_template(response) == "subjects/list.html"
    assert page_context(response)["cards"] == []
    assert "Create your first studio" in response.text


def test_my_studios_lists_cards_with_status_thumbnail_and_expiry(
    signed_in: TestClient, owner: User, app_storage: Storage, clean_db: Engine, make_user: Callable[..., User]
) -> None:
    stranger = make_user("stranger@example.com")
    with sessionmaker(bind=clean_db, expire_on_commit=False)() as session:
        subject = factories.make_subject(session, owner, name="Biscuit")
        photo = factories.make_photo(session, app_storage, subject, 0)
        session.add(Job(subject_id=subject.id, owner_id=owner.id, status="running"))
        factories.make_subject(session, stranger, name="Not mine")
        session.commit()
    response = signed_in.get("/studios")
    [card] = page_context(response)["cards"]
    assert (card.subject.name, card.status, card.thumbnail.id) == ("Biscuit", "running", photo.id)
    assert f"/studios/{subject.id}/photos/{photo.id}" in response.text
    assert "Training" in response.text and "Kept until" in response.text
    assert "Not mine" not in response.text


def test_new_studio_form(signed_in: TestClient) -> None:
    response = signed_in.get("/studios/new")
    assert response.status_code == 200
    assert page_template(response) == "subjects/new.html"
    context = page_context(response)
    assert [kind.value for kind in context["kinds"]] == ["dog", "cat", "animal", "person"]
    assert {pack["kind"] for pack in context["packs"]} == {"pet", "person"}
    assert set(context["quality_presets"]) == {"fast", "balanced", "best"}
    assert context["limits"]["max_photos"] == 20
    assert context["errors"] == [] and context["field_errors"] == {} and context["busy_notice"] is None
    assert 'enctype="multipart/form-data"' in response.text
    assert "new-studio.js" in response.text


def test_posting_the_form_creates_the_studio_and_redirects(
    signed_in: TestClient,
    csrf_token: Callable[[TestClient], str],
    valid_photos: list[tuple[str, bytes]],
    sent_tasks: list[SentTask],
    clean_db: Engine,
) -> None:
    response = signed_in.post(
        "/studios",
        data=form_fields(signed_in, csrf_token, kind="animal", class_noun_animal="Guinea Pig"),
        files=files_of(valid_photos),
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    with sessionmaker(bind=clean_db)() as session:
        subject = session.scalars(select(Subject)).one()
        assert (subject.kind, subject.class_noun, subject.images_per_prompt) == ("animal", "guinea pig", 3)
        assert subject.prompts == ["a photo of {subject}, on a skateboard", "{subject} in space"]
        job = session.scalars(select(Job)).one()
    assert response.headers["location"] == f"/studios/{subject.id}"
    assert [(task.name, task.kwargs) for task in sent_tasks] == [("training.run", {"job_id": str(job.id)})]


def test_person_noun_comes_from_its_own_field(
    signed_in: TestClient,
    csrf_token: Callable[[TestClient], str],
    person_photos: list[tuple[str, bytes]],
    sent_tasks: list[SentTask],
    clean_db: Engine,
) -> None:
    fields = form_fields(signed_in, csrf_token, kind="person", class_noun_person="man", class_noun_animal="ignored")
    response = signed_in.post("/studios", data=fields, files=files_of(person_photos), follow_redirects=False)
    assert response.status_code == 303, response.text
    with sessionmaker(bind=clean_db)() as session:
        assert session.scalars(select(Subject.class_noun)).one() == "man"


def test_errors_reshow_the_form_with_422_reasons_and_the_values_kept(
    signed_in: TestClient,
    csrf_token: Callable[[TestClient], str],
    app_storage: Storage,
    clean_db: Engine,
    sent_tasks: list[SentTask],
) -> None:
    photos = [*photo_factory.make_photos(3, start_seed=100), ("photo3.jpg", photo_factory.make_fake_pdf())]
    fields = form_fields(signed_in, csrf_token, name="Rex <b>the dog</b>", consent="", kind="animal")
    response = signed_in.post("/studios", data=fields, files=files_of(photos))
    assert response.status_code == 422
    assert page_template(response) == "subjects/new.html"
    context = page_context(response)
    assert set(context["field_errors"]) >= {"consent", "class_noun", "class_noun_animal"}
    assert [(problem.name, problem.reason[:30]) for problem in context["file_problems"]] == [
        ("photo3.jpg", "not an image we can read (PDF?")
    ]
    values = context["values"]
    assert (values["name"], values["kind"], values["consent"]) == ("Rex <b>the dog</b>", "animal", False)
    assert values["prompts"] == "on a skateboard\n{subject} in space"
    assert "Rex &lt;b&gt;the dog&lt;/b&gt;" in response.text  # shown escaped
    assert "photo3.jpg" in response.text
    assert row_count(clean_db, Subject) == row_count(clean_db, Photo) == 0
    assert app_storage.list("users/") == []
    assert sent_tasks == []


def test_too_many_photos_reshow_the_form_with_413(
    signed_in: TestClient, csrf_token: Callable[[TestClient], str]
) -> None:
    photos = [(f"p{index}.jpg", b"x") for index in range(21)]
    response = signed_in.post("/studios", data=form_fields(signed_in, csrf_token), files=files_of(photos))
    assert response.status_code == 413
    assert page_context(response)["field_errors"]["photos"] == "Upload at most 20 photos (you sent 21)."


def test_form_post_needs_the_csrf_token(
    signed_in: TestClient,
    csrf_token: Callable[[TestClient], str],
    valid_photos: list[tuple[str, bytes]],
    clean_db: Engine,
) -> None:
    fields = {**form_fields(signed_in, csrf_token), "csrf_token": "forged"}
    response = signed_in.post("/studios", data=fields, files=files_of(valid_photos))
    assert response.status_code == 403
    assert row_count(clean_db, Subject) == 0


def test_too_many_active_jobs_reshow_the_form_with_429(
    signed_in: TestClient,
    owner: User,
    csrf_token: Callable[[TestClient], str],
    valid_photos: list[tuple[str, bytes]],
    clean_db: Engine,
) -> None:
    with sessionmaker(bind=clean_db)() as session:
        for _ in range(2):
            subject = factories.make_subject(session, owner)
            session.add(Job(subject_id=subject.id, owner_id=owner.id, status="running"))
        session.commit()
    form_page = signed_in.get("/studios/new")
    assert "in training" in page_context(form_page)["busy_notice"]  # said before any photo is chosen
    response = signed_in.post("/studios", data=form_fields(signed_in, csrf_token), files=files_of(valid_photos))
    assert response.status_code == 429
    assert response.headers["retry-after"]
    assert "in training" in page_context(response)["errors"][0]


def test_photo_route_streams_the_owners_photo_only(
    signed_in: TestClient,
    owner: User,
    app_storage: Storage,
    clean_db: Engine,
    make_user: Callable[..., User],
) -> None:
    stranger = make_user("stranger@example.com")
    with sessionmaker(bind=clean_db, expire_on_commit=False)() as session:
        mine = factories.make_subject(session, owner)
        my_photo = factories.make_photo(session, app_storage, mine, 0)
        theirs = factories.make_subject(session, stranger)
        their_photo = factories.make_photo(session, app_storage, theirs, 0)
        session.commit()
    response = signed_in.get(f"/studios/{mine.id}/photos/{my_photo.id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content == app_storage.get_bytes(my_photo.storage_key)
    assert signed_in.get(f"/studios/{theirs.id}/photos/{their_photo.id}").status_code == 404
    assert signed_in.get(f"/studios/{mine.id}/photos/{their_photo.id}").status_code == 404  # mixed ids


def test_photo_route_redirects_to_a_signed_url_on_s3(
    s3_settings: Any,
    s3_storage: Any,
    owner: User,
    login: Callable[..., TestClient],
    clean_db: Engine,
) -> None:
    import httpx

    from app.main import create_app

    with sessionmaker(bind=clean_db, expire_on_commit=False)() as session:
        subject = factories.make_subject(session, owner)
        photo = factories.make_photo(session, s3_storage, subject, 0)
        session.commit()
    with TestClient(create_app(s3_settings), base_url="http://testserver") as s3_client_app:
        login(s3_client_app, owner)
        response = s3_client_app.get(f"/studios/{subject.id}/photos/{photo.id}", follow_redirects=False)
    assert response.status_code == 307
    signed = response.headers["location"]
    assert signed.startswith(s3_settings.s3_endpoint_url) and "Signature" in signed
    assert httpx.get(signed).content == s3_storage.get_bytes(photo.storage_key)


def test_the_hourly_limit_is_said_before_any_photo_is_picked(
    signed_in: TestClient, owner: User, settings: Settings, clean_db: Engine
) -> None:
    with sessionmaker(bind=clean_db)() as session:
        rate_limits.record(session, [studios_per_hour(owner, settings)] * settings.max_studios_per_hour)
        session.commit()
    notice = page_context(signed_in.get("/studios/new"))["busy_notice"]
    assert notice.startswith(f"You have created {settings.max_studios_per_hour} studios in the last hour")


def test_keep_longer_from_the_studio_page(
    signed_in: TestClient, owner: User, csrf_token: Callable[[TestClient], str], settings: Settings,
    clean_db: Engine,
) -> None:
    with sessionmaker(bind=clean_db)() as session:
        subject = factories.make_subject(session, owner, expires_at=utcnow() + timedelta(days=1))
        factories.make_job(session, subject)
        session.commit()
        subject_id = subject.id
    page = signed_in.get(f"/studios/{subject_id}").text
    assert f'action="/studios/{subject_id}/renew"' in page
    offered = utcnow() + timedelta(days=settings.retention_days)
    assert f"Keep it until {offered.day} {offered:%b %Y}" in re.sub(r"<[^>]+>", "", page)
    response = signed_in.post(f"/studios/{subject_id}/renew", data={"csrf_token": csrf_token(signed_in)},
                              follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/studios/{subject_id}"
    expected = utcnow() + timedelta(days=settings.retention_days)
    with sessionmaker(bind=clean_db)() as session:
        stored = session.get(Subject, subject_id)
        assert stored is not None and abs((stored.expires_at - expected).total_seconds()) < 60
    assert f"is now kept until {expected.day} {expected:%b %Y}, 29 days longer" in signed_in.get(
        f"/studios/{subject_id}").text
    # Now that it adds nothing, the page does not offer it, and a post says so instead of pretending.
    page = signed_in.get(f"/studios/{subject_id}").text
    assert f'action="/studios/{subject_id}/renew"' not in page
    landed = signed_in.post(f"/studios/{subject_id}/renew", data={"csrf_token": csrf_token(signed_in)}).text
    assert f"is already kept until {expected.day} {expected:%b %Y}, the longest a studio is kept" in landed
    with sessionmaker(bind=clean_db)() as session:
        again = session.get(Subject, subject_id)
        assert again is not None and abs((again.expires_at - expected).total_seconds()) < 60


def test_rename_from_the_studio_page(
    signed_in: TestClient, owner: User, csrf_token: Callable[[TestClient], str], clean_db: Engine,
) -> None:
    with sessionmaker(bind=clean_db)() as session:
        subject = factories.make_subject(session, owner)
        session.commit()
        subject_id = subject.id
    url = f"/studios/{subject_id}/rename"
    renamed = signed_in.post(url, data={"name": "  Rex   the Second ", "csrf_token": csrf_token(signed_in)})
    assert "is now called “Rex the Second”" in renamed.text
    refused = signed_in.post(url, data={"name": "   ", "csrf_token": csrf_token(signed_in)})
    assert "Give the studio a name of 1 to 100 characters" in refused.text
    with sessionmaker(bind=clean_db)() as session:
        stored = session.get(Subject, subject_id)
        assert stored is not None and stored.name == "Rex the Second"
    assert signed_in.post(url, data={"name": "Max"}).status_code == 403
