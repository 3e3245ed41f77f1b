"""The claim of an attempt: kept through a database outage, and quick after a dead lease holder on this host."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from celery.exceptions import Reject
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from app.jobs import lease
from app.models import Job
from app.storage import LocalStorage
from tests.worker.factories import make_job, make_subject, make_user
from tests.worker.fakes import FakeEngine
from worker.tasks.runtime import (
    DatabaseUnavailable,
    WorkerContext,
    claim_job,
    give_back_on_outage,
    holder_is_dead,
)
from worker.tasks.training import run_training_job


def new_job(ctx: WorkerContext, storage: LocalStorage) -> Job:
    with ctx.transaction() as session:
        return make_job(session, make_subject(session, storage, make_user(session)))


def outage(times: int, ctx: WorkerContext) -> Any:
    """A session factory whose first ``times`` sessions fail as when the server refuses connections."""
    calls = {"n": 0}

    def sessions() -> Session:
        calls["n"] += 1
        if calls["n"] <= times:
            raise sa_exc.OperationalError("connect", {}, ConnectionRefusedError("connection refused"))
        return ctx.sessions()

    return sessions


def with_sessions(ctx: WorkerContext, sessions: Any, **settings: Any) -> WorkerContext:
    return WorkerContext(settings=ctx.settings.model_copy(update=settings), storage=ctx.storage, sessions=sessions,
                         worker_id=ctx.worker_id)


def test_a_claim_that_meets_an_unreachable_database_tries_again_with_growing_waits(
        ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)
    waits: list[float] = []
    flaky = with_sessions(ctx, outage(3, ctx))
    token = claim_job(flaky, job.id, sleep=waits.append)
    assert token is not None and waits == [0.5, 1.0, 2.0]
    with ctx.transaction() as session:
        claimed = session.get(Job, job.id)
        assert claimed is not None and claimed.attempts == 1 and claimed.lease_token == token


def test_after_claim_retry_seconds_the_message_is_handed_back_not_acknowledged(
        ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)
    waits: list[float] = []
    down = with_sessions(ctx, outage(1000, ctx), claim_retry_seconds=1.2)
    with pytest.raises(DatabaseUnavailable):
        claim_job(down, job.id, sleep=waits.append)
    assert waits == [0.5, 1.0]

    def task_body() -> str:
        claim_job(down, job.id, sleep=lambda _: None)
        return "done"

    with pytest.raises(Reject) as rejected:
        give_back_on_outage(task_body)
    assert rejected.value.requeue is True


def test_an_error_that_is_not_an_outage_is_not_retried(ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)

    def broken() -> Session:
        raise sa_exc.ProgrammingError("UPDATE jobs", {}, ValueError("no such column"))

    waits: list[float] = []
    with pytest.raises(sa_exc.ProgrammingError):
        claim_job(with_sessions(ctx, broken), job.id, sleep=waits.append)
    assert waits == []


def test_a_lease_holder_is_dead_only_when_provably_so() -> None:
    host = socket.gethostname()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not holder_is_dead(f"{host}:{child.pid}", "me")  # alive
    finally:
        child.kill()
        child.wait()
    assert holder_is_dead(f"{host}:{child.pid}", "me")  # killed and collected
    assert not holder_is_dead(f"another-host:{child.pid}", "me")  # cannot be checked from here
    assert not holder_is_dead("dead-worker", "me") and not holder_is_dead(None, "me")
    assert holder_is_dead(f"{host}:123", f"{host}:123")  # this very process reuses a dead one's pid


def test_a_redelivery_whose_lease_holder_died_on_this_host_takes_over_at_once(
        ctx: WorkerContext, storage: LocalStorage) -> None:
    # The lease is long: waiting for it to go stale would take two minutes.
    patient = with_sessions(ctx, ctx.sessions, lease_seconds=120)
    job = new_job(patient, storage)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with patient.transaction() as session:
        assert lease.claim(session, job.id, f"{socket.gethostname()}:{child.pid}", 120)
    started = time.monotonic()
    assert run_training_job(job.id, ctx=patient, engine=FakeEngine(), redelivered=True) == "done"
    assert time.monotonic() - started < 30
    with patient.transaction() as session:
        done = session.get(Job, job.id)
        assert done is not None and done.attempts == 2 and done.lease_holder == patient.worker_id


def test_an_attempt_records_its_stage_durations_and_training_speed_on_the_job_and_its_worker(
        ctx: WorkerContext, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from app.models import WorkerHeartbeat, utcnow
    from worker import heartbeat
    from worker.tasks import runtime

    job = new_job(ctx, storage)
    with ctx.transaction() as session:
        # This process plays the job's child: its parent's row is the worker's.
        session.add(WorkerHeartbeat(name=heartbeat.worker_name(os.getppid()), host="here", pid=os.getppid(),
                                    queues=["gpu"], last_seen_at=utcnow()))
        token = lease.claim(session, job.id, ctx.worker_id, 30)
        claimed = session.get(Job, job.id)
    assert token is not None and claimed is not None
    clock = {"now": 100.0}
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock["now"])
    with runtime.LeasedAttempt(ctx, claimed, token) as attempt:
        attempt.write(stage="preparing", step=0, total=4)
        clock["now"] += 2.0
        attempt.write(stage="training", step=1, total=100)
        clock["now"] += 5.0
        attempt.write(stage="training", step=21, total=100, force=True)
        with ctx.transaction() as session:
            row = session.get(WorkerHeartbeat, heartbeat.worker_name(os.getppid()))
            assert row is not None and row.current_job_id == job.id
    with ctx.transaction() as session:
        details = session.get(Job, job.id).details  # type: ignore[union-attr]
        row = session.get(WorkerHeartbeat, heartbeat.worker_name(os.getppid()))
        assert row is not None and (row.current_job_id, row.steps_per_second) == (None, 4.0)
    assert details["stage_seconds"] == {"preparing": 2.0}
    assert details["steps_per_second"] == 4.0  # 20 steps in 5 s
