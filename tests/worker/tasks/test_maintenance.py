"""The reaper: stale running jobs re-queued or failed at the attempt cap, lost queued jobs re-sent."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any
from unittest.mock import patch

from sqlalchemy.orm import Session

from app import config as config_module
from app import queue
from app.config import Settings
from app.models import Job, utcnow
from app.queue import BrokerView
from app.storage import LocalStorage
from app.storage.base import preview_key
from tests.worker.factories import make_job, make_subject, make_user
from worker.settings import WorkerSettings
from worker.tasks.maintenance import reap

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
    # Not re-sent; the only task is the owner's "your studio failed" email (app.accounts.notifications).
    assert report.failed == [str(job.id)] and [name for name, _, _ in sent] == ["mail.send"]
    failed = reloaded(db_session, job)
    assert failed.status == "failed" and "stopped unexpectedly 3 times" in (failed.failure_reason or "")
    # A second pass finds nothing to do: no loop.
    assert reap(db_session, storage, worker_settings).failed == []


def no_broker_view(_: list[str]) -> BrokerView | None:
    return None  # a broker the reaper cannot read (the file-system broker)


def test_queued_jobs_never_sent_or_lost_by_the_broker_are_sent_again(db_session: Session, storage: LocalStorage,
                                                                      worker_settings: WorkerSettings,
                                                                      sent: Sent) -> None:
    resend = worker_settings.queued_resend_seconds
    never_sent = a_job(db_session, storage, enqueued_at=None, updated_at=utcnow() - timedelta(seconds=20))
    being_sent = a_job(db_session, storage, enqueued_at=None)  # the web is sending it right now
    lost = a_job(db_session, storage, enqueued_at=utcnow() - timedelta(seconds=resend + 5))
    waiting = a_job(db_session, storage, enqueued_at=utcnow())
    db_session.commit()
    report = reap(db_session, storage, worker_settings, read_broker=no_broker_view)
    db_session.commit()
    assert sorted(report.resent) == sorted([str(never_sent.id), str(lost.id)])
    assert sorted(kwargs["job_id"] for _, kwargs, _ in sent) == sorted(report.resent)
    assert str(waiting.id) not in report.resent and str(being_sent.id) not in report.resent
    # Just re-sent and stamped: the next pass leaves them alone.
    assert reap(db_session, storage, worker_settings, read_broker=no_broker_view).resent == []
    assert reloaded(db_session, never_sent).enqueued_at is not None


def test_the_resend_delay_is_a_setting(db_session: Session, storage: LocalStorage,
                                       worker_settings: WorkerSettings, sent: Sent) -> None:
    job = a_job(db_session, storage, enqueued_at=utcnow() - timedelta(seconds=90))
    db_session.commit()
    assert reap(db_session, storage, worker_settings, read_broker=no_broker_view).resent == []
    quicker = worker_settings.model_copy(update={"queued_resend_seconds": 60})
    assert reap(db_session, storage, quicker, read_broker=no_broker_view).resent == [str(job.id)]


def test_a_job_whose_message_the_broker_lost_is_sent_again_on_the_next_pass(
        db_session: Session, storage: LocalStorage, worker_settings: WorkerSettings, sent: Sent) -> None:
    a_minute_ago = utcnow() - timedelta(seconds=60)
    lost = a_job(db_session, storage, enqueued_at=a_minute_ago)
    waiting = a_job(db_session, storage, enqueued_at=a_minute_ago)
    taken = a_job(db_session, storage, enqueued_at=a_minute_ago)  # a worker holds it and is about to claim
    # Waiting for longer than the resend delay, in a long queue: its message is there, no duplicate.
    patient = a_job(db_session, storage,
                    enqueued_at=utcnow() - timedelta(seconds=worker_settings.queued_resend_seconds + 60))
    # Taken by a worker long ago and never acknowledged: the worker may be dead.
    held = a_job(db_session, storage,
                 enqueued_at=utcnow() - timedelta(seconds=worker_settings.queued_resend_seconds + 60))
    db_session.commit()
    view = BrokerView(waiting=frozenset({str(waiting.id), str(patient.id)}),
                      delivered=frozenset({str(taken.id), str(held.id)}))
    asked: list[list[str]] = []

    def read_broker(queues: list[str]) -> BrokerView:
        asked.append(queues)
        return view

    report = reap(db_session, storage, worker_settings, read_broker=read_broker)
    db_session.commit()
    assert asked == [["gpu"]]
    assert report.lost == [str(lost.id)]
    assert sorted(report.resent) == sorted([str(lost.id), str(held.id)])
    assert sorted(kwargs["job_id"] for _, kwargs, _ in sent) == sorted(report.resent)


def test_a_job_sent_while_the_reaper_reads_the_broker_is_not_taken_for_lost(
        db_session: Session, storage: LocalStorage, worker_settings: WorkerSettings, sent: Sent) -> None:
    job = a_job(db_session, storage, enqueued_at=None, updated_at=utcnow())
    db_session.commit()

    def read_broker(_: list[str]) -> BrokerView:
        view = BrokerView(waiting=frozenset(), delivered=frozenset())  # read before the message arrived...
        job.enqueued_at = utcnow()  # ...which the web then sent and stamped
        db_session.commit()
        return view

    report = reap(db_session, storage, worker_settings, read_broker=read_broker)
    db_session.commit()
    assert report.lost == [] and report.resent == [] and sent == []


def test_the_broker_view_reads_waiting_and_unacknowledged_messages_from_redis(settings: Settings) -> None:
    from tests.servers import PrivateRedis
    from worker.celery_app import create_celery

    server = PrivateRedis()
    server.start()
    try:
        config_settings = settings.model_copy(update={"broker_url": server.url})
        ids = [str(uuid.uuid4()) for _ in range(3)]
        celery = create_celery(config_settings)
        for job_id in ids:
            celery.send_task("training.run", kwargs={"job_id": job_id}, queue="gpu")
        celery.send_task("maintenance.purge_subject", kwargs={"owner_id": ids[0], "subject_id": ids[1]},
                         queue="cpu")
        import redis

        client = redis.Redis.from_url(server.url)
        # A worker took the oldest message and has not acknowledged it: kombu keeps it in a hash.
        taken = client.rpop("gpu")
        assert taken is not None
        client.hset("unacked", "tag", json.dumps([json.loads(taken), "", "gpu"]))
        with patch.object(config_module, "get_settings", lambda: config_settings):
            view = queue.broker_view(["gpu"])
            assert view is not None
            assert view.waiting == frozenset(ids[1:]) and view.delivered == frozenset(ids[:1])
            server.stop()
            assert queue.broker_view(["gpu"]) is None  # unreachable: the reaper falls back on time
    finally:
        server.remove()


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
