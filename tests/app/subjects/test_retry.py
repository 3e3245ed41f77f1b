""""Try again" on a failed studio: a new training job from the kept photos (service, API and page)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Job, Subject, User, utcnow
from app.storage import LocalStorage, Storage
from app.subjects.service import RetryRefused, TooManyActiveJobs, retry_studio
from tests.app import factories
from tests.app.subjects.conftest import SentTask

FAILED = "The studio's storage is full, so this job could not save its results."


def failed_studio(session: Session, storage: Storage, owner: User, photos: int = 3,
                  status: str = "failed") -> Subject:
    subject = factories.make_subject(session, owner)
    for position in range(photos):
        factories.make_photo(session, storage, subject, position)
    factories.make_job(session, subject, status=status, stage="training", attempts=1,
                       failure_reason=FAILED if status == "failed" else None)
    return subject


def jobs_of(session: Session, subject: Subject) -> list[Job]:
    return list(session.execute(select(Job).where(Job.subject_id == subject.id).order_by(Job.created_at)).scalars())


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_failed_or_cancelled_studio_trains_again_from_its_kept_photos(
        db_session: Session, storage: LocalStorage, settings: Settings, sent_tasks: list[SentTask],
        status: str) -> None:
    owner = factories.make_user(db_session)
    subject = failed_studio(db_session, storage, owner, status=status)
    job = retry_studio(db_session, settings, owner, subject)
    assert sent_tasks == []  # sent once the transaction commits
    db_session.commit()
    assert (job.kind, job.status, job.attempts, job.max_attempts) == ("train", "queued", 0, settings.max_attempts)
    assert [each.status for each in jobs_of(db_session, subject)] == [status, "queued"]
    assert [(task.name, task.kwargs) for task in sent_tasks] == [("training.run", {"job_id": str(job.id)})]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("running", "Only a studio whose training failed or was cancelled"),
        ("done", "Only a studio whose training failed or was cancelled"),
        ("trained", "already trained"),
        ("photos gone", "photos are no longer kept"),
        ("no photo rows", "photos are no longer kept"),
    ],
)
def test_a_studio_that_cannot_train_again_is_refused_with_the_reason(
        db_session: Session, storage: LocalStorage, settings: Settings, sent_tasks: list[SentTask], case: str,
        reason: str) -> None:
    owner = factories.make_user(db_session)
    subject = failed_studio(db_session, storage, owner, photos=0 if case == "no photo rows" else 3,
                            status={"running": "running", "done": "done"}.get(case, "failed"))
    if case == "trained":
        subject.weights_key = "users/x/weights/y/"
    if case == "photos gone":
        subject.photos_deleted_at = utcnow()
    with pytest.raises(RetryRefused, match=reason):
        retry_studio(db_session, settings, owner, subject)
    db_session.commit()
    assert len(jobs_of(db_session, subject)) == 1 and sent_tasks == []


def test_a_retry_counts_against_the_active_job_limit(db_session: Session, storage: LocalStorage,
                                                     settings: Settings) -> None:
    owner = factories.make_user(db_session)
    subject = failed_studio(db_session, storage, owner)
    for _ in range(settings.max_active_jobs_per_user):
        factories.make_job(db_session, factories.make_subject(db_session, owner, name="Other"), status="running")
    with pytest.raises(TooManyActiveJobs):
        retry_studio(db_session, settings, owner, subject)


def test_the_api_tries_again_and_answers_conflict_when_it_cannot(
        client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User],
        api_headers: Callable[[User], dict[str, str]], sent_tasks: list[SentTask]) -> None:
    user = make_user()
    subject = failed_studio(db, app_storage, db.merge(user))
    db.commit()
    headers = api_headers(user)

    response = client.post(f"/api/v1/subjects/{subject.id}/retry", headers=headers)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["job"]["status"] == "queued" and body["subject"]["status"] == "queued"
    assert response.headers["location"] == f"/api/v1/jobs/{body['job']['id']}"
    assert [task.kwargs for task in sent_tasks] == [{"job_id": body["job"]["id"]}]

    again = client.post(f"/api/v1/subjects/{subject.id}/retry", headers=headers)  # now it is queued
    assert again.status_code == 409 and "failed or was cancelled" in again.json()["detail"]
    assert client.post(f"/api/v1/subjects/{subject.id}/retry").status_code in (401, 403)


def test_the_failed_studio_page_offers_try_again_and_its_button_starts_a_job(
        client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User],
        login: Callable[..., TestClient], csrf_token: Callable[[TestClient], str],
        sent_tasks: list[SentTask]) -> None:
    user = make_user()
    subject = failed_studio(db, app_storage, db.merge(user))
    db.commit()
    login(client, user)
    page = client.get(f"/studios/{subject.id}")
    assert "storage is full, so this job could not save its results" in page.text
    assert f'action="/studios/{subject.id}/retry"' in page.text and ">Try again</button>" in page.text

    url = f"/studios/{subject.id}/retry"
    assert client.post(url, data={}, follow_redirects=False).status_code == 403
    response = client.post(url, data={"csrf_token": csrf_token(client)}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/studios/{subject.id}"
    db.expire_all()
    assert [job.status for job in jobs_of(db, subject)] == ["failed", "queued"] and len(sent_tasks) == 1
    assert "Trying again" in client.get(f"/studios/{subject.id}").text


def test_a_trained_studios_failed_page_points_to_a_new_studio_instead(
        client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User],
        login: Callable[..., TestClient]) -> None:
    user = make_user()
    subject = failed_studio(db, app_storage, db.merge(user), photos=0)
    subject.photos_deleted_at = utcnow()
    db.commit()
    login(client, user)
    page = client.get(f"/studios/{subject.id}")
    assert f'action="/studios/{subject.id}/retry"' not in page.text and 'href="/studios/new"' in page.text
