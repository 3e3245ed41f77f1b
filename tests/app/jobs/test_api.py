"""The jobs API: status, a subject's jobs, cancel, previews."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.models import Job, User
from app.storage import Storage
from app.storage.base import checkpoint_prefix, job_prefix, preview_key
from tests.app.factories import make_job, make_subject, png_bytes

Headers = Callable[[User], dict[str, str]]


def test_status_of_a_training_job(client: TestClient, db: Session, make_user: Callable[..., User],
                                  api_headers: Headers) -> None:
    user = make_user()
    subject = make_subject(db, db.merge(user))
    job = make_job(db, subject, status="running", stage="training", step=120, total=400, eta_seconds=125.0,
                   loss=0.12, details={"demo_model": True, "loss_history": [0.3, 0.2, 0.12]})
    db.commit()

    response = client.get(f"/api/v1/jobs/{job.id}", headers=api_headers(user))
    assert response.status_code == 200
    body = response.json()
    assert body["stage_label"] == "Training step 120/400 — about 2 min left"
    assert body["status"] == "running"
    assert body["demo_model"] is True
    assert body["loss_history"] == [0.3, 0.2, 0.12]
    assert body["queue_position"] is None
    assert body["finished"] is False
    assert 0.2 < body["fraction"] < 0.8
    assert body["notes"] == []
    assert response.headers["cache-control"] == "no-store"


def test_status_is_cheap(client: TestClient, db: Session, app: object, make_user: Callable[..., User],
                         api_headers: Headers) -> None:
    """The endpoint every open studio page polls: auth plus at most two queries, and no storage calls."""
    user = make_user()
    job = make_job(db, make_subject(db, db.merge(user)))
    db.commit()
    headers = api_headers(user)
    client.get(f"/api/v1/jobs/{job.id}", headers=headers)  # the token's last_used_at is written once

    statements: list[str] = []
    engine = db.get_bind()

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        response = client.get(f"/api/v1/jobs/{job.id}", headers=headers)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 200
    assert response.json()["queue_position"] == 1
    job_queries = [s for s in statements if "api_tokens" not in s]
    assert len(job_queries) <= 2, job_queries


def test_status_takes_one_trip_to_the_thread_pool(
    client: TestClient, db: Session, make_user: Callable[..., User], api_headers: Headers,
    login: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under load every trip waits behind the event loop for the GIL; a poll with the usual dependencies
    made three (who is asking, the handler, the commit) and its p99 was several times higher."""
    user = make_user()
    job = make_job(db, make_subject(db, db.merge(user)))
    db.commit()
    trips: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        trips.append(getattr(func, "__name__", repr(func)))
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    assert client.get(f"/api/v1/jobs/{job.id}", headers=api_headers(user)).status_code == 200
    assert len(trips) == 1, trips
    login(client, user)
    trips.clear()
    assert client.get(f"/api/v1/jobs/{job.id}").status_code == 200
    assert len(trips) == 1, trips


def test_subject_jobs_newest_first(client: TestClient, db: Session, make_user: Callable[..., User],
                                   api_headers: Headers) -> None:
    user = make_user()
    subject = make_subject(db, db.merge(user))
    trained = make_job(db, subject, status="done", stage="finished")
    more = make_job(db, subject, kind="generate")
    db.commit()
    response = client.get(f"/api/v1/subjects/{subject.id}/jobs", headers=api_headers(user))
    assert response.status_code == 200
    assert [item["id"] for item in response.json()] == [str(more.id), str(trained.id)]


def test_cancel_through_the_api(client: TestClient, db: Session, make_user: Callable[..., User],
                                api_headers: Headers) -> None:
    user = make_user()
    subject = make_subject(db, db.merge(user))
    queued = make_job(db, subject)
    running = make_job(db, subject, status="running", stage="priors")
    db.commit()
    headers = api_headers(user)

    response = client.post(f"/api/v1/jobs/{queued.id}/cancel", headers=headers)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = client.post(f"/api/v1/jobs/{queued.id}/cancel", headers=headers)
    assert again.status_code == 409
    assert "already ended" in again.json()["detail"]

    response = client.post(f"/api/v1/jobs/{running.id}/cancel", headers=headers)
    assert response.status_code == 200
    assert response.json()["cancel_requested"] is True
    assert response.json()["stage_label"] == "Cancelling…"
    db.expire_all()
    stored = db.get(Job, running.id)
    assert stored is not None and stored.cancel_requested and stored.status == "running"


def test_cancelling_a_job_that_waits_for_its_retry_removes_its_checkpoint_and_previews(
    client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User], api_headers: Headers,
) -> None:
    user = make_user()
    subject = make_subject(db, db.merge(user))
    # The reaper put it back in line after its worker died: attempt 1's checkpoint and previews are recorded.
    job = make_job(db, subject, status="queued", stage="training", attempts=1)
    checkpoint = checkpoint_prefix(subject.owner_id, subject.id, job.id) + "a1-step000010/"
    app_storage.put_bytes(checkpoint + "training_state.json", b"{}")
    preview = preview_key(subject.owner_id, subject.id, job.id, "a1-training-000010-0.png")
    app_storage.put_bytes(preview, png_bytes(3), "image/png")
    job.details = {"checkpoint": {"prefix": checkpoint, "path": "run/checkpoints/step-10", "step": 10}}
    job.preview_keys = [preview]
    other = make_job(db, subject, status="done", stage="finished")
    kept = preview_key(subject.owner_id, subject.id, other.id, "a1-training-000010-0.png")
    app_storage.put_bytes(kept, png_bytes(4), "image/png")
    db.commit()

    response = client.post(f"/api/v1/jobs/{job.id}/cancel", headers=api_headers(user))
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["preview_urls"] == []
    assert app_storage.list(job_prefix(subject.owner_id, subject.id, job.id)) == []
    assert app_storage.exists(kept)
    db.expire_all()
    stored = db.get(Job, job.id)
    assert stored is not None and "checkpoint" not in stored.details and stored.preview_keys == []


def test_cancel_with_the_cookie_needs_the_csrf_header(
    client: TestClient, db: Session, make_user: Callable[..., User], login: Callable[..., TestClient],
    csrf_token: Callable[[TestClient], str],
) -> None:
    user = make_user()
    job = make_job(db, make_subject(db, db.merge(user)))
    db.commit()
    login(client, user)
    assert client.post(f"/api/v1/jobs/{job.id}/cancel").status_code == 403
    response = client.post(f"/api/v1/jobs/{job.id}/cancel", headers={"X-CSRF-Token": csrf_token(client)})
    assert response.status_code == 200


def test_previews_are_streamed_by_index(client: TestClient, db: Session, app_storage: Storage,
                                        make_user: Callable[..., User], api_headers: Headers) -> None:
    user = make_user()
    subject = make_subject(db, db.merge(user))
    job = make_job(db, subject, status="running", stage="training")
    key = preview_key(subject.owner_id, subject.id, job.id, "step-100.png")
    app_storage.put_bytes(key, png_bytes(5), "image/png")
    job.preview_keys = [key]
    db.commit()
    headers = api_headers(user)

    status = client.get(f"/api/v1/jobs/{job.id}", headers=headers).json()
    response = client.get(status["preview_urls"][0], headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == png_bytes(5)
    assert client.get(f"/api/v1/jobs/{job.id}/previews/1", headers=headers).status_code == 404


def test_unauthenticated_requests_get_401(client: TestClient, db: Session, make_user: Callable[..., User]) -> None:
    job = make_job(db, make_subject(db, db.merge(make_user())))
    db.commit()
    assert client.get(f"/api/v1/jobs/{job.id}").status_code == 401
