"""End to end with real processes: a `celery worker` subprocess, Redis or the file-system broker, the
test database, local storage and the tiny model on the CPU.

Each test starts its own worker with STUDIO_* variables pointing at the test's database, var/ and
media folders, creates a studio's rows and photos directly, enqueues its job through app.queue (sent
after commit, as the web does) and watches the database. Redis runs in a private database number,
emptied before and after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app import config as config_module
from app import queue
from app.config import Settings
from app.models import GeneratedImage, GenerationRequest, Job, Photo, PriorBank, Subject
from app.storage import LocalStorage
from app.storage.base import subject_prefix
from tests.worker.factories import make_job, make_subject, make_user
from tests.worker.processes import ROOT, stop_worker, wait_until_ready, worker_env

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("STUDIO_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
JOB_TIMEOUT = 300.0  # generous: CI machines are shared; a healthy job takes seconds
FAST_TRAINING = {"steps": 10, "checkpoint_every": 5, "preview_every": 0}


@dataclass
class Studio:
    """The test's side of a running worker: settings, database sessions, storage."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: LocalStorage
    worker: subprocess.Popen[bytes]
    log_path: Path

    def session(self) -> Session:
        return self.sessions()

    def create_studio(self, class_noun: str = "dog") -> Job:
        """A subject with 4 photos and its queued training job, enqueued after commit like the web does."""
        with self.session() as session:
            subject = make_subject(session, self.storage, make_user(session), photos=4, class_noun=class_noun,
                                   kind="dog" if class_noun == "dog" else "animal", images_per_prompt=1)
            job = make_job(session, subject, max_attempts=3)
            queue.enqueue(session, "training.run", job_id=str(job.id))
            session.commit()
        return job

    def job(self, job_id: uuid.UUID) -> Job:
        with self.session() as session:
            found = session.get(Job, job_id)
            assert found is not None
            return found

    def wait_for(self, job_id: uuid.UUID, predicate: Callable[[Job], bool], what: str,
                 timeout: float = JOB_TIMEOUT) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if predicate(job):
                return job
            if self.worker.poll() is not None:
                pytest.fail(f"the worker exited ({self.worker.returncode}) waiting for {what}\n{self.log_tail()}")
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; job is {self.job(job_id).status}/{self.job(job_id).stage}\n"
                    f"{self.log_tail()}")

    def wait_finished(self, job_id: uuid.UUID) -> Job:
        return self.wait_for(job_id, lambda job: job.status in ("done", "failed", "cancelled"), "the job to end")

    def images_of(self, job_id: uuid.UUID) -> list[GeneratedImage]:
        with self.session() as session:
            return list(session.execute(select(GeneratedImage).where(GeneratedImage.job_id == job_id)).scalars())

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def _empty_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture
def start_studio(settings: Settings, clean_db: Engine, monkeypatch: pytest.MonkeyPatch,
                 tmp_path: Path) -> Iterator[Callable[..., Studio]]:
    """Starts a worker subprocess (once per test) on the chosen broker and returns the test's handle."""
    started: list[Studio] = []

    def start(broker: str = "redis", training: dict[str, Any] | None = None) -> Studio:
        broker_url = REDIS_URL if broker == "redis" else ""
        if broker == "redis":
            _empty_redis()
        values = settings.model_copy(update={"broker_url": broker_url, "media_dir": tmp_path / "media",
                                             "lease_seconds": 6})
        monkeypatch.setattr(config_module, "get_settings", lambda: values)
        log_path = tmp_path / f"worker-{len(started)}.log"
        with log_path.open("wb") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker", "-Q", "gpu,cpu",
                 "-c", "1", "-l", "INFO", "-n", f"e2e-{uuid.uuid4().hex[:8]}@localhost", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=ROOT, env=worker_env(values, training or FAST_TRAINING), stdout=log_file,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        studio = Studio(values, sessionmaker(bind=clean_db, expire_on_commit=False),
                        LocalStorage(values.resolved_media_dir), worker, log_path)
        started.append(studio)
        return studio

    yield start
    for studio in started:
        stop_worker(studio.worker)
    if any(studio.settings.broker_url for studio in started):
        _empty_redis()


def _assert_published(studio: Studio, job: Job) -> list[GeneratedImage]:
    assert job.status == "done", f"{job.status}: {job.failure_reason}\n{studio.log_tail()}"
    images = studio.images_of(job.id)
    assert len(images) == 2  # 2 prompts x 1 image
    assert all(studio.storage.exists(image.storage_key) for image in images)
    with studio.session() as session:
        subject = session.get(Subject, job.subject_id)
        assert subject is not None and subject.identifier and subject.weights_key
        assert studio.storage.list(subject.weights_key)
        assert subject.photos_deleted_at is not None
        assert session.execute(select(Photo).where(Photo.subject_id == subject.id)).first() is None
    assert job.details["demo_model"] is True and job.details["base_model"] == "tiny"
    return images


@pytest.mark.parametrize("broker_name", ["redis", "filesystem"])
def test_a_studio_runs_to_done_and_its_gallery_is_published(start_studio: Callable[..., Studio],
                                                            broker_name: str) -> None:
    studio = start_studio(broker_name)
    job = studio.create_studio()
    done = studio.wait_finished(job.id)
    _assert_published(studio, done)
    assert done.details["prior_generated"] == 4 and done.attempts == 1


def test_duplicate_delivery_bank_reuse_and_deletion(start_studio: Callable[..., Studio]) -> None:
    studio = start_studio("redis")
    first = studio.create_studio()
    done = studio.wait_finished(first.id)
    images = _assert_published(studio, done)

    # A forced duplicate delivery of the finished job exits at the claim.
    queue.send_now("training.run", job_id=str(first.id))
    # A second studio of the same class queues behind it on the one-process worker.
    second = studio.create_studio()
    second_done = studio.wait_finished(second.id)
    _assert_published(studio, second_done)
    assert second_done.details["prior_generated"] == 0 and second_done.details["prior_reused"] == 4
    again = studio.job(first.id)
    assert again.attempts == 1 and again.status == "done"
    assert len(studio.images_of(first.id)) == len(images)
    assert "not claimable" in studio.log_tail(200_000)
    with studio.session() as session:
        assert session.execute(select(func.count()).select_from(PriorBank)).scalar_one() == 1

    # "Generate more" on the second studio samples its published weights, without retraining.
    with studio.session() as session:
        more = Job(subject_id=second.subject_id, owner_id=second.owner_id, kind="generate")
        session.add(more)
        session.flush()
        session.add(GenerationRequest(subject_id=second.subject_id, job_id=more.id,
                                      prompts=["a photo of {subject} as an astronaut"], images_per_prompt=2))
        queue.enqueue(session, "generation.run", job_id=str(more.id))
        session.commit()
    generated = studio.wait_finished(more.id)
    assert generated.status == "done", f"{generated.failure_reason}\n{studio.log_tail()}"
    more_images = studio.images_of(more.id)
    assert len(more_images) == 2 and all(studio.storage.exists(image.storage_key) for image in more_images)
    assert all("astronaut" in image.prompt and image.prompt_template == "a photo of {subject} as an astronaut"
               for image in more_images)

    # Deleting the first studio leaves no file of it and no row pointing to it; the bank stays.
    from app.subjects.deletion import delete_subject

    with studio.session() as session:
        subject = session.get(Subject, first.subject_id)
        assert subject is not None
        delete_subject(session, studio.storage, subject)
        session.commit()
    assert studio.storage.list(subject_prefix(first.owner_id, first.subject_id)) == []
    with studio.session() as session:
        for model in (Job, GeneratedImage, Photo):
            count = session.execute(select(func.count()).select_from(model).where(
                model.subject_id == first.subject_id)).scalar_one()  # type: ignore[attr-defined]
            assert count == 0
    assert studio.storage.list("priors/")


def test_cancel_during_training_stops_within_a_few_steps(start_studio: Callable[..., Studio]) -> None:
    studio = start_studio("redis", {"steps": 100_000, "checkpoint_every": 3, "preview_every": 0})
    job = studio.create_studio()
    training = studio.wait_for(job.id, lambda j: j.stage == "training" and bool(j.details.get("checkpoint")),
                               "training with a checkpoint")
    with studio.session() as session:
        found = session.get(Job, job.id)
        assert found is not None
        found.cancel_requested = True
        session.commit()
        requested_at_step = max(training.step, found.step)
    cancelled = studio.wait_finished(job.id)
    assert cancelled.status == "cancelled", cancelled.failure_reason
    # The worker reads the flag every 0.3 s here. The tiny model makes ~40 steps a second, so "a few
    # steps" of a real model is a few hundred here; a missed flag would run to step 100 000.
    assert requested_at_step <= cancelled.step <= requested_at_step + 400, (requested_at_step, cancelled.step)
    assert studio.images_of(job.id) == []
    leftovers = studio.storage.list(subject_prefix(job.owner_id, job.subject_id))
    assert all("/photos/" in key for key in leftovers), leftovers
    assert not (studio.settings.scratch_dir / str(job.id)).exists()


def test_a_killed_worker_child_resumes_from_its_checkpoint_and_publishes_once(
        start_studio: Callable[..., Studio]) -> None:
    # Long enough that the kill lands between the first checkpoint and the end on a slow machine too.
    studio = start_studio("redis", {"steps": 150, "checkpoint_every": 10, "preview_every": 0})
    job = studio.create_studio()
    recorded = studio.wait_for(job.id, lambda j: bool(j.details.get("checkpoint")), "the first checkpoint")
    checkpoint_step = recorded.details["checkpoint"]["step"]
    children = psutil.Process(studio.worker.pid).children()
    assert len(children) == 1
    children[0].send_signal(signal.SIGKILL)

    # Celery hands the task out again at once, marked redelivered; that delivery finds the lease
    # holder's process dead on this host and takes over at once (the reaper would otherwise re-queue it).
    done = studio.wait_finished(job.id)
    _assert_published(studio, done)
    assert done.attempts == 2
    assert done.details["resumed_from"] >= checkpoint_step > 0
    assert "redelivered; its lease holder" in studio.log_tail(200_000)
    assert studio.storage.list(subject_prefix(job.owner_id, job.subject_id) + f"jobs/{job.id}/checkpoint/") == []
    assert not (studio.settings.scratch_dir / str(job.id)).exists()


def test_a_job_that_kills_its_worker_every_time_ends_failed_without_a_loop(
        start_studio: Callable[..., Studio]) -> None:
    studio = start_studio("redis", {"steps": 100_000, "checkpoint_every": 0, "preview_every": 0})
    job = studio.create_studio()
    for attempt in (1, 2, 3):
        studio.wait_for(job.id, lambda j, n=attempt: j.status == "running" and j.attempts == n,  # type: ignore[misc]
                        f"attempt {attempt} to start")
        children = psutil.Process(studio.worker.pid).children()
        assert len(children) == 1
        children[0].send_signal(signal.SIGKILL)
    failed = studio.wait_finished(job.id)
    assert failed.status == "failed" and failed.attempts == 3
    assert "stopped unexpectedly 3 times" in (failed.failure_reason or "")
    assert studio.images_of(job.id) == []
    # No loop: the last delivery was acknowledged and nothing is left to run.
    time.sleep(studio.settings.lease_seconds + 1)
    assert studio.job(job.id).attempts == 3


def test_jobs_lost_with_an_emptied_redis_are_sent_again_by_the_reaper_and_finish(
        start_studio: Callable[..., Studio]) -> None:
    from worker.tasks.maintenance import reap

    studio = start_studio("redis")
    wait_until_ready(studio.log_path, studio.worker, timeout=60)
    worker = psutil.Process(studio.worker.pid)
    group = [worker, *worker.children(recursive=True)]
    for process in group:
        process.suspend()  # the worker is busy elsewhere: the jobs wait in Redis...
    try:
        jobs = [studio.create_studio() for _ in range(3)]
        _empty_redis()  # ...and Redis loses them (flushed, or restarted without persistence)
    finally:
        for process in group:
            process.resume()
    # The worker's blocking read may already have taken one message off the list before the flush;
    # the others are gone, and their jobs stay queued.
    time.sleep(3)
    assert [job for job in jobs if studio.job(job.id).status == "queued"], "no message was lost"

    # Beat's next reaper pass reads Redis and finds the jobs that have no message there (the
    # 15-minute "sent long ago" rule is not needed).
    with studio.session() as session:
        report = reap(session, studio.storage, studio.settings)
        session.commit()
    assert report.lost and set(report.resent) == set(report.lost) <= {str(job.id) for job in jobs}
    for job in jobs:
        done = studio.wait_finished(job.id)
        _assert_published(studio, done)  # once each, even if a re-sent message met a job already claimed
        assert done.attempts == 1
