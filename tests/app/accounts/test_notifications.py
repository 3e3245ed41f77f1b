"""The "your studio is ready / failed" emails: sent where the worker ends a training, through a real
SMTP server on loopback, with a link and never a picture, and not at all to an owner who opted out."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.jobs import lease
from app.models import Job, OutgoingEmail, Subject, User
from app.storage import Storage
from tests.mailbox import Mailbox, html_of, text_of
from tests.worker.factories import make_job, make_subject

MakeUser = Callable[..., User]
REASON = "Training diverged (the loss became NaN); try the fast preset or fewer steps."


def running_job(db: Session, storage: Storage, owner: User, kind: str = "train") -> tuple[Subject, Job, str]:
    fresh = db.get(User, owner.id)
    assert fresh is not None
    subject = make_subject(db, storage, fresh, photos=0, name="Rex & <Co>")
    job = make_job(db, subject, kind=kind)
    token = lease.claim(db, job.id, "test-worker", 60)
    assert token is not None
    db.commit()
    return subject, job, token


def test_a_finished_training_sends_a_link_and_no_picture(db: Session, app_storage: Storage, make_user: MakeUser,
                                                        mailbox: Mailbox, settings: Settings) -> None:
    subject, job, token = running_job(db, app_storage, make_user("ann@example.com"))
    assert lease.finish(db, job.id, token, "done")
    db.commit()
    [message] = mailbox.wait_for(1)
    assert message["To"] == "ann@example.com" and message["Subject"] == "Your studio “Rex & <Co>” is ready"
    assert f"{settings.base_url}/studios/{subject.id}" in text_of(message)
    assert list(message.iter_attachments()) == []
    html = html_of(message)
    assert "<img" not in html and "Rex &amp; &lt;Co&gt;" in html  # escaped, no pictures


def test_a_failed_training_says_what_the_studio_page_says(db: Session, app_storage: Storage, make_user: MakeUser,
                                                         mailbox: Mailbox) -> None:
    _, job, token = running_job(db, app_storage, make_user("bob@example.com"))
    assert lease.finish(db, job.id, token, "failed", failure_reason=REASON)
    db.commit()
    _, gave_up, _ = running_job(db, app_storage, make_user("cat@example.com"))
    db.execute(Job.__table__.update().where(Job.id == gave_up.id).values(attempts=3, heartbeat_at=None))
    assert lease.fail_if_exhausted(db, gave_up.id, 60)  # the worker died on every attempt
    db.commit()
    messages = {message["To"]: message for message in mailbox.wait_for(2)}
    assert REASON in text_of(messages["bob@example.com"])
    assert messages["cat@example.com"]["Subject"] == "Your studio “Rex & <Co>” could not be finished"
    assert lease.exhausted_reason(3) in text_of(messages["cat@example.com"])


def test_no_email_for_an_owner_who_opted_out_nor_for_generate_more(
        db: Session, app_storage: Storage, make_user: MakeUser, mailbox: Mailbox, client: TestClient,
        login: Callable[..., TestClient], csrf_token: Callable[[TestClient], str]) -> None:
    quiet, busy = make_user("quiet@example.com"), make_user("busy@example.com")
    login(client, quiet)
    answer = client.post("/account/notifications", data={"csrf_token": csrf_token(client)},
                         follow_redirects=False)  # the box unticked
    assert answer.status_code == 303
    _, job, token = running_job(db, app_storage, quiet)
    assert lease.finish(db, job.id, token, "done")
    _, more, more_token = running_job(db, app_storage, busy, kind="generate")
    assert lease.finish(db, more.id, more_token, "done")
    db.commit()
    assert mailbox.deliver() == 0 and mailbox.messages == []
    assert db.scalar(select(func.count()).select_from(OutgoingEmail)) == 0
    client.post("/account/notifications", data={"csrf_token": csrf_token(client), "notify": "on"})
    _, again, again_token = running_job(db, app_storage, quiet)
    assert lease.finish(db, again.id, again_token, "failed", failure_reason=REASON)
    db.commit()
    assert [message["To"] for message in mailbox.wait_for(1)] == ["quiet@example.com"]
