"""The reaper: stale running jobs re-queued or failed at the attempt cap, lost queued jobs re-sent."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.models import Job, utcnow
from app.storage import LocalStorage
from app.storage.base import preview_key
from tests.worker.factories import make_job, make_subject, make_user
from worker.settings import WorkerSettings
from worker.tasks.maintenance import QUEUED_RESEND_SECONDS, reap

Sent = list[tuple[str, dict[str, str], str]]


def a_job(session: Session, storage: LocalStorage, **fields: Any) -> Job:
    subject = make_subject(session, storage, make_user(session), photos=1)
    return make_job(session, subject, **fields)


def reloaded(session: Session, job: Job) -> Job:
    session.expire_all()
    found = session.get(Job, job.id)
    assert found is not None
    return found


def test_a_stale_running_job_is_requeued_and_sent(db_session: Session, storage: LocalStorage,
                                                  worker_settings: WorkerSettings, sent: Sent) -> None:
    long_ago = utcnow() - timedelta(seconds=worker_settings.lease_seconds + 10)
    job = a_job(db_session, storage, status="running", attempts=1, lease_token="dead", heartbeat_at=long_ago,
                kind="generate")
    live = a_job(db_session, storage, status="running", attempts=1, lease_token="alive", heartbeat_at=utcnow())
    db_session.commit()
    report = reap(db_session, storage, worker_settings)
    assert sent == []  # nothing goes out before the commit
    db_session.commit()
    assert report.requeued == [str(job.id)]
    assert sent == [("generation.run", {"job_id": str(job.id)}, "gpu")]
    requeued = reloaded(db_session, job)
    assert (requeued.status, requeued.lease_token, requeued.attempts) == ("queued", None, 1)
    assert requeued.enqueued_at is not None
    assert reloaded(db_session, live).status == "running"


def test_a_job_that_killed_its_worker_every_time_ends_failed(db_session: Session, storage: LocalStorage,
                                                             worker_settings: WorkerSettings, sent: Sent) -> None:
    long_ago = utcnow() - timedelta(seconds=worker_settings.lease_seconds + 10)
    job = a_job(db_session, storage, status="running", attempts=3, max_attempts=3, lease_token="x",
                heartbeat_at=long_ago)
    db_session.commit()
    report = reap(db_session, storage, worker_settings)
    db_session.commit()
    assert report.failed == [str(job.id)] and sent == []
    failed = reloaded(db_session, job)
    assert failed.status == "failed" and "stopped unexpectedly 3 times" in (failed.failure_reason or "")
    # A second pass finds nothing to do: no loop.
    assert reap(db_session, storage, worker_settings).failed == []


def test_queued_jobs_never_sent_or_lost_by_the_broker_are_sent_again(db_session: Session, storage: LocalStorage,
                                                                      worker_settings: WorkerSettings,
                                                                      sent: Sent) -> None:
    never_sent = a_job(db_session, storage, enqueued_at=None)
    lost = a_job(db_session, storage, enqueued_at=utcnow() - timedelta(seconds=QUEUED_RESEND_SECONDS + 5))
    waiting = a_job(db_session, storage, enqueued_at=utcnow())
    db_session.commit()
    report = reap(db_session, storage, worker_settings)
    db_session.commit()
    assert sorted(report.resent) == sorted([str(never_sent.id), str(lost.id)])
    assert sorted(kwargs["job_id"] for _, kwargs, _ in sent) == sorted(report.resent)
    assert str(waiting.id) not in report.resent
    # Just re-sent: the next pass leaves them alone.
    assert reap(db_session, storage, worker_settings).resent == []


def test_a_cancel_requested_job_whose_worker_died_ends_cancelled(db_session: Session, storage: LocalStorage,
                                                                 worker_settings: WorkerSettings, sent: Sent) -> None:
    long_ago = utcnow() - timedelta(seconds=worker_settings.lease_seconds + 10)
    job = a_job(db_session, storage, status="running", attempts=1, lease_token="dead", heartbeat_at=long_ago,
                cancel_requested=True)
    key = preview_key(job.owner_id, job.subject_id, job.id, "a1.png")
    storage.put_bytes(key, b"png")
    db_session.commit()
    report = reap(db_session, storage, worker_settings)
    db_session.commit()
    assert report.cancelled == [str(job.id)] and sent == []
    assert reloaded(db_session, job).status == "cancelled" and not storage.exists(key)
