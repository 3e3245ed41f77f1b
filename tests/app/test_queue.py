"""Enqueue after commit: sent when the transaction commits, dropped when it rolls back."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from app import queue
from app.models import Job, utcnow
from app.storage import LocalStorage
from tests.worker.factories import make_job, make_subject, make_user


@pytest.fixture
def job(db_session: Session, storage: LocalStorage) -> Job:
    subject = make_subject(db_session, storage, make_user(db_session), photos=1)
    created = make_job(db_session, subject)
    db_session.commit()
    return created


@pytest.fixture
def sent() -> Iterator[list[tuple[str, dict[str, str], str]]]:
    captured: list[tuple[str, dict[str, str], str]] = []
    queue.set_sender(lambda name, kwargs, queue_name: captured.append((name, kwargs, queue_name)))
    yield captured
    queue.set_sender(None)


def test_a_task_is_sent_only_after_commit_with_ids_to_its_queue(db_session: Session, job: Job,
                                                                 sent: list[tuple[str, dict[str, str], str]]) -> None:
    queue.enqueue(db_session, "training.run", job_id=str(job.id))
    assert sent == [] and len(queue.pending_tasks(db_session)) == 1
    db_session.flush()
    assert sent == []
    db_session.commit()
    assert sent == [("training.run", {"job_id": str(job.id)}, "gpu")]
    assert queue.pending_tasks(db_session) == []
    db_session.expire_all()
    enqueued = db_session.get(Job, job.id)
    assert enqueued is not None and enqueued.enqueued_at is not None
    # A later commit sends nothing again.
    db_session.commit()
    assert len(sent) == 1


def test_a_rollback_drops_the_task_and_enqueued_at(db_session: Session, job: Job,
                                                   sent: list[tuple[str, dict[str, str], str]]) -> None:
    queue.enqueue(db_session, "training.run", job_id=str(job.id))
    db_session.rollback()
    db_session.commit()
    assert sent == [] and queue.pending_tasks(db_session) == []
    reloaded = db_session.get(Job, job.id)
    assert reloaded is not None and reloaded.enqueued_at is None


def test_a_savepoint_rollback_keeps_the_outer_transactions_tasks(db_session: Session, job: Job,
                                                                 sent: list[tuple[str, dict[str, str], str]]) -> None:
    queue.enqueue(db_session, "training.run", job_id=str(job.id))
    savepoint = db_session.begin_nested()
    savepoint.rollback()
    db_session.commit()
    assert [name for name, *_ in sent] == ["training.run"]


def test_maintenance_tasks_go_to_the_cpu_queue(db_session: Session,
                                               sent: list[tuple[str, dict[str, str], str]]) -> None:
    ids = {"owner_id": str(uuid.uuid4()), "subject_id": str(uuid.uuid4())}
    queue.enqueue(db_session, "maintenance.purge_subject", **ids)
    db_session.commit()
    assert sent == [("maintenance.purge_subject", ids, "cpu")]


def test_bad_names_and_ids_are_refused(db_session: Session, job: Job) -> None:
    with pytest.raises(ValueError, match="unknown task name"):
        queue.enqueue(db_session, "photos.steal", job_id=str(job.id))
    with pytest.raises(ValueError, match="not a UUID"):
        queue.enqueue(db_session, "training.run", job_id="../etc")
    with pytest.raises(TypeError, match="must be a string"):
        queue.enqueue(db_session, "training.run", job_id=job.id)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no job"):
        queue.enqueue(db_session, "training.run", job_id=str(uuid.uuid4()))
    with pytest.raises(ValueError, match="at least one id"):
        queue.enqueue(db_session, "maintenance.reap")


def test_a_failed_send_is_logged_and_does_not_undo_the_commit(db_session: Session, job: Job,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    def broken(name: str, kwargs: dict[str, str], queue_name: str) -> None:
        raise ConnectionError("broker down")

    job.enqueued_at = utcnow() - timedelta(hours=1)  # sent once before (a re-send, as the reaper does)
    db_session.commit()
    queue.set_sender(broken)
    try:
        queue.enqueue(db_session, "training.run", job_id=str(job.id))
        with caplog.at_level(logging.ERROR, logger="app.queue"):
            db_session.commit()
    finally:
        queue.set_sender(None)
    assert "the reaper will re-send it" in caplog.text
    db_session.expire_all()
    reloaded = db_session.get(Job, job.id)
    # The row is committed, and it says that no message is waiting for it.
    assert reloaded is not None and reloaded.status == "queued" and reloaded.enqueued_at is None


def test_a_job_whose_send_failed_is_sent_by_the_next_reaper_pass(db_session: Session, job: Job, storage: LocalStorage,
                                                                 sent: list[tuple[str, dict[str, str], str]]) -> None:
    from worker.settings import get_worker_settings
    from worker.tasks.maintenance import NEVER_SENT_GRACE_SECONDS, reap

    queue.set_sender(lambda *_: (_ for _ in ()).throw(ConnectionError("broker down")))
    queue.enqueue(db_session, "training.run", job_id=str(job.id))
    db_session.commit()
    queue.set_sender(lambda name, kwargs, queue_name: sent.append((name, kwargs, queue_name)))
    # The broker is back; beat's next pass (every 30 s) finds the job without a stamp and sends it.
    later = utcnow() + timedelta(seconds=NEVER_SENT_GRACE_SECONDS + 1)
    report = reap(db_session, storage, get_worker_settings(), now=later)
    db_session.commit()
    assert report.resent == [str(job.id)] and sent == [("training.run", {"job_id": str(job.id)}, "gpu")]
    db_session.expire_all()
    stamped = db_session.get(Job, job.id)
    assert stamped is not None and stamped.enqueued_at is not None


def test_the_default_sender_puts_the_task_on_the_file_system_broker(db_session: Session, job: Job,
                                                                    settings: object) -> None:
    from app.config import Settings
    from worker.celery_app import filesystem_broker_folders

    assert isinstance(settings, Settings)
    queue.enqueue(db_session, "training.run", job_id=str(job.id))
    db_session.commit()
    messages = list(filesystem_broker_folders(settings)["data_folder_out"].glob("*.msg"))
    assert len(messages) == 1
    body = messages[0].read_text()
    assert str(job.id) in body and "training.run" in body
