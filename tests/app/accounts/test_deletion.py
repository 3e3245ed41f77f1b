"""Deleting an account leaves no file in storage and no row that points to it, on every backend."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import rate_limits
from app.accounts import service as accounts_service
from app.accounts import throttle
from app.accounts.deletion import delete_account, purge_user_files, user_prefix
from app.config import Settings
from app.mail import queue_email
from app.models import (
    Base,
    DataExport,
    GeneratedImage,
    GenerationRequest,
    OutgoingEmail,
    PasswordReset,
    RateEvent,
    User,
    utcnow,
)
from app.storage import Storage
from app.storage.base import checkpoint_prefix, image_key, preview_key, weights_prefix, zip_key
from tests.app.conftest import PASSWORD, page_context
from tests.app.storage.conftest import s3_client, s3_endpoint, s3_settings, s3_storage  # noqa: F401
from tests.mailbox import Mailbox, text_of
from tests.worker.factories import make_job, make_subject

MakeUser = Callable[..., User]
Headers = Callable[[User], dict[str, str]]


def fill_account(session: Session, storage: Storage, settings: Settings, user: User) -> None:
    """Everything an account can own: two studios with every kind of file and job, sessions, tokens, a
    reset link, an export, a queued message and rate-limit rows (flushed)."""
    for name in ("Rex", "Tom"):
        subject = make_subject(session, storage, user, photos=2, name=name)
        done = make_job(session, subject, status="done")
        running = make_job(session, subject, status="running", lease_token="t", attempts=1)
        generate = make_job(session, subject, kind="generate")
        session.add(GenerationRequest(subject_id=subject.id, job_id=generate.id, prompts=["x {subject}"]))
        image_id = uuid.uuid4()
        session.add(GeneratedImage(id=image_id, subject_id=subject.id, job_id=done.id,
                                   storage_key=image_key(user.id, subject.id, image_id), prompt="p",
                                   prompt_template="p", seed=1, steps=1, guidance=1.0, width=8, height=8))
        for key in (image_key(user.id, subject.id, image_id), preview_key(user.id, subject.id, running.id, "p.png"),
                    checkpoint_prefix(user.id, subject.id, running.id) + "state.pt",
                    weights_prefix(user.id, subject.id) + "x/pytorch_lora_weights.safetensors",
                    zip_key(user.id, subject.id, "gallery.zip")):
            storage.put_bytes(key, b"data")
    export_key = f"{user_prefix(user.id)}exports/{uuid.uuid4()}.zip"
    storage.put_bytes(export_key, b"zip")
    session.add(DataExport(user_id=user.id, status="ready", storage_key=export_key,
                           expires_at=utcnow() + timedelta(hours=1)))
    accounts_service.start_session(session, user, settings)
    accounts_service.create_api_token(session, user, "script")
    session.add(PasswordReset(user_id=user.id, token_hash=uuid.uuid4().hex * 2, expires_at=utcnow()))
    queue_email(session, user.email, "password_changed", base_url=settings.base_url)
    rate_limits.record(session, [
        (rate_limits.Limit("studios", 10, timedelta(hours=1)), str(user.id)),
        (throttle.PASSWORD_CHANGE, str(user.id)), (throttle.VERIFY_RESEND, str(user.id)),
        (throttle.ACCOUNT, user.email), (throttle.RESET_EMAIL, user.email),
    ])
    session.flush()


def rows_pointing_to(session: Session, user_id: uuid.UUID) -> dict[str, int]:
    """For every column that refers to an account (directly, or through a studio or job of it): its rows
    that point into the account."""
    subject_ids = select(Base.metadata.tables["subjects"].c.id).where(
        Base.metadata.tables["subjects"].c.owner_id == user_id)
    job_ids = select(Base.metadata.tables["jobs"].c.id).where(Base.metadata.tables["jobs"].c.owner_id == user_id)
    found: dict[str, int] = {}
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            targets = {key.target_fullname for key in column.foreign_keys}
            if (table.name, column.name) == ("users", "id") or "users.id" in targets:
                condition = column == user_id
            elif "subjects.id" in targets:
                condition = column.in_(subject_ids)
            elif "jobs.id" in targets:
                condition = column.in_(job_ids)
            else:
                continue
            count = int(session.scalar(select(func.count()).select_from(table).where(condition)) or 0)
            if count:
                found[f"{table.name}.{column.name}"] = count
    return found


def account_rate_keys(user: User) -> set[str]:
    by_id = [rate_limits.counter_key((rate_limits.Limit(scope, 1, timedelta(0)), str(user.id)))
             for scope in throttle.SCOPES_BY_ACCOUNT_ID]
    by_email = [rate_limits.counter_key((rate_limits.Limit(scope, 1, timedelta(0)), user.email))
                for scope in throttle.SCOPES_BY_EMAIL]
    return set(by_id + by_email)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_deleting_an_account_leaves_no_file_and_no_row_of_it(
        backend: str, request: pytest.FixtureRequest, db: Session, settings: Settings, mailbox: Mailbox,
        make_user: MakeUser) -> None:
    storage: Storage = request.getfixturevalue("s3_storage" if backend == "s3" else "storage")
    user, other = db.merge(make_user("gone@example.com")), db.merge(make_user("stays@example.com"))
    fill_account(db, storage, settings, user)
    kept = make_subject(db, storage, other, photos=2)
    db.commit()
    user_id = user.id
    assert rows_pointing_to(db, user_id) and storage.list(user_prefix(user_id))
    rate_keys = account_rate_keys(user)
    assert len(rate_keys) == 5 and set(db.scalars(select(RateEvent.key))) == rate_keys

    assert delete_account(db, storage, settings, user) == 2
    db.commit()

    assert storage.list(user_prefix(user_id)) == []
    db.expire_all()
    assert rows_pointing_to(db, user_id) == {}
    assert db.scalar(select(func.count()).select_from(RateEvent)) == 0
    assert len(storage.list(user_prefix(other.id))) == 2 and db.get(type(kept), kept.id) is not None
    # The running jobs were told to stop (their rows went: a worker finds its job gone and stops); the
    # files are purged once more after the commit, for whatever a worker wrote meanwhile.
    sent = [name for name, _ in mailbox.sent]
    assert sent.count("maintenance.purge_subject") == 2 and "maintenance.purge_user" in sent
    storage.put_bytes(f"{user_prefix(user_id)}subjects/{uuid.uuid4()}/late.png", b"late")
    assert purge_user_files(db, storage, str(user_id)) == 1 and storage.list(user_prefix(user_id)) == []
    # The one message left is the last one; the queued one was withdrawn.
    [last] = mailbox.wait_for(1)
    assert last["To"] == "gone@example.com" and last["Subject"] == "Your account is deleted"
    assert "2 studios" in text_of(last)
    assert db.scalar(select(func.count()).select_from(OutgoingEmail)) == 0


def test_delete_my_account_asks_for_the_password(client: TestClient, make_user: MakeUser, api_headers: Headers,
                                                 mailbox: Mailbox, db: Session) -> None:
    user = make_user("leaving@example.com")
    headers = api_headers(user)
    wrong = client.post("/api/v1/me/delete", headers=headers, json={"password": "not my password"})
    assert wrong.status_code == 403 and db.get(User, user.id) is not None
    gone = client.post("/api/v1/me/delete", headers=headers, json={"password": PASSWORD})
    assert gone.status_code == 204
    assert client.get("/api/v1/me", headers=headers).status_code == 401
    db.expire_all()
    assert db.get(User, user.id) is None and rows_pointing_to(db, user.id) == {}
    assert [message["Subject"] for message in mailbox.wait_for(1)] == ["Your account is deleted"]


def test_the_account_page_deletes_after_the_password(client: TestClient, make_user: MakeUser,
                                                     login: Callable[..., TestClient],
                                                     csrf_token: Callable[[TestClient], str], mailbox: Mailbox,
                                                     db: Session) -> None:
    user = make_user("page@example.com")
    login(client, user)
    wrong = client.post("/account/delete", data={"password": "not my password", "csrf_token": csrf_token(client)})
    assert wrong.status_code == 400 and page_context(wrong)["delete_errors"]
    gone = client.post("/account/delete", data={"password": PASSWORD, "csrf_token": csrf_token(client)},
                       follow_redirects=False)
    assert gone.status_code == 303 and gone.headers["location"] == "/"
    assert client.get("/account", follow_redirects=False).status_code == 303  # signed out: the session went too
    assert db.get(User, user.id) is None
