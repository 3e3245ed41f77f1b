"""Faults injected into real processes: a private PostgreSQL stopped and started, a private Redis stopped,
emptied or restarted, a worker child killed with SIGKILL. Each test asserts that the waiting jobs finish
soon after the cause is gone, and prints what it measured (``pytest -s``): docs/pipeline.md's fault matrix
quotes these lines.

Every test runs its own `celery worker` (and, where the reaper's schedule matters, `celery beat` and a
CPU worker for the reaper, as docker-compose does) on a private Redis, so stopping or emptying it
touches nobody else; the machine's shared servers are never stopped.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from app import config as config_module
from app import queue
from app.config import Settings
from app.db import make_engine
from app.models import Job, utcnow
from app.storage import LocalStorage
from tests.conftest import run_migrations
from tests.servers import PrivatePostgres, PrivateRedis
from tests.worker.processes import ROOT, stop_worker, suspended, wait_until_ready, worker_env
from tests.worker.test_end_to_end import FAST_TRAINING, Studio, _assert_published

pytestmark = pytest.mark.slow

# The goal: no fault leaves a job waiting more than 2 minutes once its cause is gone.
RECOVERY_GOAL = 120.0
# How long a test waits for a job to end: its own training, on a shared 2-core machine under load.
FINISH_TIMEOUT = 900.0


def wait_finished(studio: Studio, job_id: uuid.UUID) -> Job:
    return studio.wait_for(job_id, lambda job: job.status in ("done", "failed", "cancelled"), "the job to end",
                           timeout=FINISH_TIMEOUT)


def report(fault: str, **numbers: float) -> None:
    """One line of measurements for the fault matrix."""
    values = ", ".join(f"{name} {value:.1f} s" for name, value in numbers.items())
    print(f"\nFAULT {fault}: {values}")


@pytest.fixture
def private_redis() -> Iterator[Callable[..., PrivateRedis]]:
    servers: list[PrivateRedis] = []

    def start(persistent: bool = False) -> PrivateRedis:
        server = PrivateRedis(persistent=persistent)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.remove()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def start_rig(settings: Settings, clean_db: Engine, monkeypatch: pytest.MonkeyPatch,
              tmp_path: Path) -> Iterator[Callable[..., Studio]]:
    """Starts a worker (and beat when asked) on ``broker_url`` and ``database_url`` (default the test's)."""
    processes: list[subprocess.Popen[bytes]] = []
    engines: list[Engine] = []

    def start(broker_url: str, database_url: str | None = None, beat: bool = False,
              training: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Studio:
        values = settings.model_copy(update={"broker_url": broker_url, "media_dir": tmp_path / "media",
                                             "database_url": database_url or settings.database_url,
                                             "lease_seconds": 6})
        monkeypatch.setattr(config_module, "get_settings", lambda: values)
        engine = clean_db
        if database_url:
            engine = make_engine(database_url)
            engines.append(engine)
        environment = {**worker_env(values, training or FAST_TRAINING), **(env or {})}
        log_path = tmp_path / "worker.log"

        def spawn(arguments: list[str], log: Path) -> subprocess.Popen[bytes]:
            with log.open("wb") as log_file:
                process = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", *arguments],
                    cwd=ROOT, env=environment, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
            processes.append(process)
            return process

        def worker_arguments(queues: str) -> list[str]:
            return ["worker", "-Q", queues, "-c", "1", "-l", "INFO", "-n", f"fault-{uuid.uuid4().hex[:8]}@localhost",
                    "--without-gossip", "--without-mingle", "--without-heartbeat"]

        # With beat, as in docker-compose: the reaper runs on a CPU worker of its own, not behind a training.
        worker = spawn(worker_arguments("gpu" if beat else "gpu,cpu"), log_path)
        if beat:
            cpu_worker = spawn(worker_arguments("cpu"), tmp_path / "cpu-worker.log")
            wait_until_ready(tmp_path / "cpu-worker.log", cpu_worker, timeout=120)
            spawn(["beat", "-l", "INFO", "--schedule", str(tmp_path / "celerybeat-schedule")],
                  tmp_path / "beat.log")
        studio = Studio(values, sessionmaker(bind=engine, expire_on_commit=False),
                        LocalStorage(values.resolved_media_dir), worker, log_path)
        wait_until_ready(log_path, worker, timeout=120)
        return studio

    yield start
    for process in processes:
        stop_worker(process)
    for engine in engines:
        engine.dispose()


def test_a_database_outage_keeps_the_waiting_jobs_messages_and_they_run_when_it_returns(
        start_rig: Callable[..., Studio], private_postgres: PrivatePostgres,
        private_redis: Callable[..., PrivateRedis]) -> None:
    url = private_postgres.create_database("studio")
    run_migrations(url)
    broker = private_redis()
    studio = start_rig(broker.url, database_url=url)
    with suspended(studio.worker.pid, url):
        jobs = [studio.create_studio() for _ in range(3)]  # committed and sent while the worker is busy
        private_postgres.stop()
    # The database stays away 15 s. Before the fix the worker failed a claim every second or two and
    # each failure acknowledged (dropped) a waiting message: after 15 s the queue was empty.
    time.sleep(15)
    view = queue.broker_view(["gpu"])
    assert view is not None
    assert all(view.holds(str(job.id)) for job in jobs), (view, studio.log_tail())
    assert "the database is unreachable" in studio.log_tail(200_000)

    private_postgres.start()
    back = time.monotonic()
    first = studio.wait_for(jobs[0].id, lambda job: job.status != "queued", "the first job to be claimed",
                            timeout=RECOVERY_GOAL)
    claimed_after = time.monotonic() - back
    for job in jobs:
        _assert_published(studio, wait_finished(studio, job.id))
        assert studio.job(job.id).attempts == 1
    all_done_after = time.monotonic() - back
    assert first.attempts == 1 and claimed_after < 30, claimed_after
    report("database down 15 s, 3 jobs waiting", first_claim_after_return=claimed_after,
           all_three_done_after_return=all_done_after)


def test_a_studio_created_while_redis_is_down_starts_soon_after_redis_returns(
        start_rig: Callable[..., Studio], private_redis: Callable[..., PrivateRedis]) -> None:
    broker = private_redis()
    studio = start_rig(broker.url, beat=True)
    broker.stop()
    sent_at = time.monotonic()
    job = studio.create_studio()  # the web answers 201: the rows are committed, the send fails
    send_seconds = time.monotonic() - sent_at
    assert studio.job(job.id).enqueued_at is None, "a failed send must not look sent"
    broker.start()  # back, and empty
    back = time.monotonic()
    started = studio.wait_for(job.id, lambda found: found.status != "queued", "the job to start",
                              timeout=RECOVERY_GOAL)
    started_after = time.monotonic() - back
    _assert_published(studio, wait_finished(studio, job.id))
    report("Redis down when a studio is created", failed_send=send_seconds, started_after_return=started_after)
    assert started.attempts == 1 and started_after < 90, started_after


def test_jobs_an_emptied_redis_lost_are_found_and_sent_by_the_next_reaper_pass(
        start_rig: Callable[..., Studio], private_redis: Callable[..., PrivateRedis]) -> None:
    broker = private_redis()  # no persistence: a restart loses everything
    studio = start_rig(broker.url, beat=True)
    with suspended(studio.worker.pid, studio.settings.resolved_database_url):
        jobs = [studio.create_studio() for _ in range(3)]
        broker.stop()
        broker.start()
        restarted_at = utcnow()
    emptied = time.monotonic()
    assert studio.settings.queued_resend_seconds == 15 * 60  # not shortened: the reaper reads Redis

    def sent_again_or_started(found: Job) -> bool:
        return found.status != "queued" or (found.enqueued_at is not None and found.enqueued_at > restarted_at)

    for job in jobs:
        studio.wait_for(job.id, sent_again_or_started, "the job to be sent again", timeout=RECOVERY_GOAL)
    resent_after = time.monotonic() - emptied
    for job in jobs:
        done = wait_finished(studio, job.id)
        _assert_published(studio, done)  # once each, even where a re-sent message met a claimed job
        assert done.attempts == 1
    report("Redis restarted without persistence, 3 jobs queued", all_back_in_the_queue_after=resent_after,
           all_three_done_after=time.monotonic() - emptied)
    assert resent_after < 75, resent_after  # beat's pass every 30 s, plus a slow machine's start-up


def test_a_killed_worker_childs_job_is_taken_over_at_once_not_after_the_lease(
        start_rig: Callable[..., Studio], private_redis: Callable[..., PrivateRedis]) -> None:
    lease_seconds = 120
    broker = private_redis()
    studio = start_rig(broker.url, training={"steps": 150, "checkpoint_every": 10, "preview_every": 0},
                       env={"STUDIO_LEASE_SECONDS": str(lease_seconds)})
    job = studio.create_studio()
    recorded = studio.wait_for(job.id, lambda found: bool(found.details.get("checkpoint")), "the first checkpoint")
    checkpoint_step = recorded.details["checkpoint"]["step"]
    children = psutil.Process(studio.worker.pid).children()
    assert len(children) == 1
    children[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    studio.wait_for(job.id, lambda found: found.attempts == 2 or found.status != "running", "the second attempt",
                    timeout=lease_seconds + 60)
    resumed_after = time.monotonic() - killed
    done = wait_finished(studio, job.id)
    _assert_published(studio, done)
    assert done.attempts == 2 and done.details["resumed_from"] >= checkpoint_step > 0
    assert "is dead on this host, taking over at once" in studio.log_tail(200_000)
    report("worker child SIGKILLed mid-training", second_attempt_after=resumed_after, lease=lease_seconds)
    assert resumed_after < lease_seconds / 4, resumed_after


def test_a_redis_restart_with_persistence_does_not_stop_a_running_training(
        start_rig: Callable[..., Studio], private_redis: Callable[..., PrivateRedis]) -> None:
    broker = private_redis(persistent=True)
    studio = start_rig(broker.url, training={"steps": 100_000, "checkpoint_every": 0, "preview_every": 0})
    job = studio.create_studio()
    studio.wait_for(job.id, lambda found: found.stage == "training" and found.step > 0, "training")
    broker.stop()
    broker.start()  # a blip: the append-only file brings every message back
    at_restart = studio.job(job.id).step
    # The same attempt goes on training: not cancelled by the lost connection, not started again.
    going_on = studio.wait_for(job.id, lambda found: found.step >= at_restart + 5 or found.status != "running",
                               "training to go on after the blip")
    assert going_on.status == "running" and going_on.attempts == 1
    with studio.session() as session:  # ends the long run
        found = session.get(Job, job.id)
        assert found is not None
        found.cancel_requested = True
        session.commit()
    ended = wait_finished(studio, job.id)
    assert ended.status == "cancelled" and ended.attempts == 1
    log = studio.log_tail(200_000)
    assert "Restoring 1 unacknowledged message" in log  # the connection was really lost
    assert "Terminating" not in log and "worker_cancel_long_running_tasks_on_connection_loss" not in log
