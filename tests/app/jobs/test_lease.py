"""The job lease: one atomic claim, fenced heartbeats, progress and finish (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from app.jobs import lease
from app.models import Job, utcnow
from app.storage import LocalStorage
from tests.worker.factories import make_job, make_subject, make_user

LEASE = 60


@pytest.fixture
def job(db_session: Session, storage: LocalStorage) -> Job:
    subject = make_subject(db_session, storage, make_user(db_session), photos=1)
    created = make_job(db_session, subject)
    db_session.commit()
    return created


def reload(session: Session, job: Job) -> Job:
    session.expire_all()
    found = session.get(Job, job.id)
    assert found is not None
    return found


def test_claim_takes_a_queued_job_once(db_session: Session, job: Job) -> None:
    token = lease.claim(db_session, job.id, "w1", LEASE)
    db_session.commit()
    assert token is not None
    claimed = reload(db_session, job)
    assert (claimed.status, claimed.lease_token, claimed.attempts) == ("running", token, 1)
    assert claimed.started_at is not None and claimed.heartbeat_at is not None
    # A duplicate delivery finds it claimed by a live worker.
    assert lease.claim(db_session, job.id, "w2", LEASE) is None
    assert reload(db_session, job).attempts == 1


def test_a_stale_running_job_is_reclaimed_with_a_new_token_and_the_old_one_loses(db_session: Session,
                                                                                   job: Job) -> None:
    first = lease.claim(db_session, job.id, "w1", LEASE, now=utcnow() - timedelta(seconds=LEASE + 5))
    db_session.commit()
    started = reload(db_session, job).started_at
    second = lease.claim(db_session, job.id, "w2", LEASE)
    db_session.commit()
    assert first and second and first != second
    again = reload(db_session, job)
    assert again.attempts == 2 and again.started_at == started
    assert lease.heartbeat(db_session, job.id, first) is False
    assert lease.update_progress(db_session, job.id, first, stage="training", step=3) is False
    assert lease.finish(db_session, job.id, first, "done") is False
    assert lease.heartbeat(db_session, job.id, second) is True
    assert lease.finish(db_session, job.id, second, "done", stage="finished") is True
    db_session.commit()
    done = reload(db_session, job)
    assert (done.status, done.stage) == ("done", "finished") and done.finished_at is not None
    assert lease.claim(db_session, job.id, "w3", LEASE) is None


def test_claim_refuses_exhausted_and_cancel_requested_jobs(db_session: Session, job: Job) -> None:
    job.attempts = job.max_attempts
    db_session.commit()
    assert lease.claim(db_session, job.id, "w1", LEASE) is None
    job = reload(db_session, job)
    job.attempts, job.cancel_requested = 0, True
    db_session.commit()
    assert lease.claim(db_session, job.id, "w1", LEASE) is None


def test_progress_is_fenced_and_limited_to_progress_columns(db_session: Session, job: Job) -> None:
    token = lease.claim(db_session, job.id, "w1", LEASE)
    assert token is not None
    assert lease.update_progress(db_session, job.id, token, stage="training", step=5, total=10, loss=0.5,
                                 details={"loss_history": [0.5]}, preview_keys=["a.png"])
    db_session.commit()
    updated = reload(db_session, job)
    assert (updated.stage, updated.step, updated.total, updated.loss) == ("training", 5, 10, 0.5)
    assert updated.details == {"loss_history": [0.5]} and updated.preview_keys == ["a.png"]
    with pytest.raises(ValueError, match="lease_token"):
        lease.update_progress(db_session, job.id, token, lease_token="mine")
    assert lease.update_progress(db_session, job.id, "not-the-token", step=6) is False


def test_finish_checks_its_arguments(db_session: Session, job: Job) -> None:
    token = lease.claim(db_session, job.id, "w1", LEASE)
    assert token is not None
    with pytest.raises(ValueError, match="finish status"):
        lease.finish(db_session, job.id, token, "running")
    with pytest.raises(ValueError, match="failure_reason"):
        lease.finish(db_session, job.id, token, "failed")
    with pytest.raises(ValueError, match="lease_seconds"):
        lease.claim(db_session, job.id, "w1", 0)
    assert lease.finish(db_session, job.id, token, "failed", failure_reason="It broke.")
    db_session.commit()
    assert reload(db_session, job).failure_reason == "It broke."


def test_should_stop_names_the_reason(db_session: Session, job: Job) -> None:
    token = lease.claim(db_session, job.id, "w1", LEASE)
    db_session.commit()
    assert token is not None
    assert lease.should_stop(db_session, job.id, token) is None
    assert lease.should_stop(db_session, job.id, "other") == "lost"
    reload(db_session, job).cancel_requested = True
    db_session.commit()
    assert lease.should_stop(db_session, job.id, token) == "cancelled"
    db_session.delete(reload(db_session, job))
    db_session.commit()
    assert lease.should_stop(db_session, job.id, token) == "deleted"


def test_fail_if_exhausted_ends_only_dead_jobs(db_session: Session, job: Job) -> None:
    token = lease.claim(db_session, job.id, "w1", LEASE)
    db_session.commit()
    assert token is not None
    job = reload(db_session, job)
    job.attempts = job.max_attempts
    db_session.commit()
    # Its heartbeat is fresh: a live worker's job is never ended.
    assert lease.fail_if_exhausted(db_session, job.id, LEASE) is False
    later = utcnow() + timedelta(seconds=LEASE + 1)
    assert lease.fail_if_exhausted(db_session, job.id, LEASE, now=later) is True
    db_session.commit()
    failed = reload(db_session, job)
    assert failed.status == "failed" and failed.lease_token is None
    assert "stopped unexpectedly 3 times" in (failed.failure_reason or "")


def test_the_claim_records_the_lease_holder(db_session: Session, job: Job) -> None:
    assert lease.claim(db_session, job.id, "gpu-box:4242", LEASE)
    db_session.commit()
    assert reload(db_session, job).lease_holder == "gpu-box:4242"


def test_take_over_from_a_dead_holder_is_fenced_on_its_token_and_holder(db_session: Session, job: Job) -> None:
    dead = lease.claim(db_session, job.id, "gpu-box:4242", LEASE)
    db_session.commit()
    assert dead is not None
    assert lease.take_over(db_session, job.id, "gpu-box:5000", dead, "gpu-box:1111") is None  # not the holder
    assert lease.take_over(db_session, job.id, "gpu-box:5000", "other-token", "gpu-box:4242") is None
    token = lease.take_over(db_session, job.id, "gpu-box:5000", dead, "gpu-box:4242")
    db_session.commit()
    assert token is not None and token != dead
    taken = reload(db_session, job)
    assert (taken.lease_token, taken.lease_holder, taken.attempts) == (token, "gpu-box:5000", 2)
    assert lease.heartbeat(db_session, job.id, dead) is False
    # Only once: a second delivery finds the token changed.
    assert lease.take_over(db_session, job.id, "gpu-box:6000", dead, "gpu-box:4242") is None


def test_take_over_respects_the_attempt_cap_and_a_cancel(db_session: Session, job: Job) -> None:
    dead = lease.claim(db_session, job.id, "gpu-box:4242", LEASE)
    assert dead is not None
    job_row = reload(db_session, job)
    job_row.max_attempts = 1
    db_session.commit()
    assert lease.take_over(db_session, job.id, "gpu-box:5000", dead, "gpu-box:4242") is None
    job_row = reload(db_session, job)
    job_row.max_attempts, job_row.cancel_requested = 3, True
    db_session.commit()
    assert lease.take_over(db_session, job.id, "gpu-box:5000", dead, "gpu-box:4242") is None
