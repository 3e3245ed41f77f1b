"""The studio page (template and context) and its cancel form."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Job, User, utcnow
from app.storage import Storage
from tests.app.factories import make_image, make_job, make_photo, make_subject


def test_studio_page_shows_the_queued_job(client: TestClient, db: Session, app_storage: Storage,
                                          make_user: Callable[..., User], login: Callable[..., TestClient]) -> None:
    user, stranger = make_user(), make_user()  # accounts first: their commits need the database unlocked
    subject = make_subject(db, user)
    photos = [make_photo(db, app_storage, subject, position) for position in range(3)]
    other = make_subject(db, stranger)
    make_job(db, other, created_at=utcnow() - timedelta(minutes=1))
    job = make_job(db, subject)
    db.commit()
    login(client, user)

    response = client.get(f"/studios/{subject.id}")
    assert response.status_code == 200
    assert response.template.name == "jobs/studio.html"  # type: ignore[attr-defined]
    context = response.context  # type: ignore[attr-defined]
    assert context["subject"].id == subject.id
    assert context["job"].id == job.id
    assert context["status"].queue_position == 2
    assert context["status"].stage_label == "Waiting in line — 1 job ahead"
    assert [photo.id for photo in context["photos"]] == [photo.id for photo in photos]
    assert context["demo_model"] is False
    assert context["can_generate"] is False
    assert f"/studios/{subject.id}/photos/{photos[0].id}" in response.text
    assert f'data-status-url="/api/v1/jobs/{job.id}"' in response.text
    assert "studio-progress.js" in response.text


def test_studio_page_of_a_finished_demo_job(client: TestClient, db: Session, app_storage: Storage,
                                            make_user: Callable[..., User], login: Callable[..., TestClient]) -> None:
    user = make_user()
    subject = make_subject(db, user, weights_key="w", photos_deleted_at=utcnow())
    job = make_job(db, subject, status="done", stage="finished", details={"demo_model": True, "base_model": "tiny"})
    make_image(db, app_storage, subject, job)
    db.commit()
    login(client, user)

    response = client.get(f"/studios/{subject.id}")
    context = response.context  # type: ignore[attr-defined]
    assert context["status"].stage_label == "Done"
    assert context["demo_model"] is True
    assert context["photos_deleted"] is True
    assert context["image_count"] == 1
    assert context["can_generate"] is True
    assert "built-in demo model" in response.text
    assert "photos were deleted after training" in response.text
    assert f"/studios/{subject.id}/gallery" in response.text


def test_studio_page_of_a_failed_job_gives_the_reason(
    client: TestClient, db: Session, make_user: Callable[..., User], login: Callable[..., TestClient]
) -> None:
    user = make_user()
    subject = make_subject(db, user)
    make_job(db, subject, status="failed", stage="training", attempts=3,
             failure_reason="Training stopped: the loss became NaN three times.")
    db.commit()
    login(client, user)
    response = client.get(f"/studios/{subject.id}")
    assert response.context["status"].stage_label.startswith("Failed: Training stopped")  # type: ignore[attr-defined]
    assert "the loss became NaN three times" in response.text
    assert "Try again" in response.text


def test_studio_page_needs_a_login(client: TestClient, db: Session, make_user: Callable[..., User]) -> None:
    subject = make_subject(db, make_user())
    db.commit()
    response = client.get(f"/studios/{subject.id}", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


def test_cancel_form(client: TestClient, db: Session, make_user: Callable[..., User],
                     login: Callable[..., TestClient], csrf_token: Callable[[TestClient], str]) -> None:
    user = make_user()
    subject = make_subject(db, user)
    job = make_job(db, subject)
    db.commit()
    login(client, user)
    url = f"/studios/{subject.id}/jobs/{job.id}/cancel"

    assert client.post(url, data={}, follow_redirects=False).status_code == 403
    response = client.post(url, data={"csrf_token": csrf_token(client)}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == f"/studios/{subject.id}"
    db.expire_all()
    assert db.get(Job, job.id).status == "cancelled"  # type: ignore[union-attr]

    page = client.get(f"/studios/{subject.id}")
    assert page.context["flash"].message == "The job was cancelled."  # type: ignore[attr-defined]
    assert page.context["status"].stage_label == "Cancelled"  # type: ignore[attr-defined]

    again = client.post(url, data={"csrf_token": csrf_token(client)})
    assert "already ended" in again.context["flash"].message  # type: ignore[attr-defined]


def test_cancel_form_checks_the_job_belongs_to_the_studio(
    client: TestClient, db: Session, make_user: Callable[..., User], login: Callable[..., TestClient],
    csrf_token: Callable[[TestClient], str],
) -> None:
    user = make_user()
    first, second = make_subject(db, user), make_subject(db, user, name="Tom")
    job = make_job(db, first)
    db.commit()
    login(client, user)
    response = client.post(f"/studios/{second.id}/jobs/{job.id}/cancel", data={"csrf_token": csrf_token(client)})
    assert response.status_code == 404


def test_studio_page_renders_the_stepper_without_javascript(
    client: TestClient, db: Session, make_user: Callable[..., User], login: Callable[..., TestClient]
) -> None:
    user = make_user()
    subject = make_subject(db, user)
    make_job(db, subject, status="running", stage="training", step=3, total=10)
    db.commit()
    login(client, user)
    html = client.get(f"/studios/{subject.id}").text
    assert 'class="stepper__item is-done" data-step="priors"' in html
    assert 'class="stepper__item is-current" data-step="training"' in html
    assert 'class="stepper__item " data-step="generating"' in html
    assert 'value="0.3000" data-step-bar' in html  # the training bar, drawn by the browser from the markup
