"""End to end with real processes: a `celery worker` subprocess, Redis or the file-system broker, the
test database, local storage and the tiny model on the CPU.

Each test starts its own worker with STUDIO_* variables pointing at the test's database, var/ and
media folders, creates a studio's rows and photos directly, enqueues its job through app.queue (sent
after commit, as the web does) and watches the database. Redis is a private redis-server started for
the test session (unless STUDIO_TEST_REDIS_URL names one), emptied before and after each test.
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
from tests.worker.processes import ROOT, kill_and_wait, stop_worker, wait_until_ready, worker_env

pytestmark = pytest.mark.slow

# Set, the tests use that Redis; unset, each test session starts a private redis-server on a free port, so
# two sessions on one machine (several engineers, CI jobs) never consume or flush each other's messages.
CONFIGURED_REDIS_URL = os.environ.get("STUDIO_TEST_REDIS_URL")
REDIS_URL = CONFIGURED_REDIS_URL or ""  # the session's Redis, set by the redis_url fixture
JOB_TIMEOUT = 300.0  # a job that makes no progress this long fails the test; a slow machine just waits longer
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
        """Wait until ``predicate(job)``; fail when the job made no progress (status, stage, step, attempt)
        for ``timeout`` seconds, so a slow, loaded machine waits longer and a stuck job still fails."""
        deadline = time.monotonic() + timeout
        last_progress: tuple[object, ...] = ()
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if predicate(job):
                return job
            progress = (job.status, job.stage, job.step, job.attempts)
            if progress != last_progress:
                last_progress, deadline = progress, time.monotonic() + timeout
            if self.worker.poll() is not None:
                pytest.fail(f"the worker exited ({self.worker.returncode}) waiting for {what}\n{self.log_tail()}")
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; job is {self.job(job_id).status}/{self.job(job_id).stage}\n"
                    f"{self.log_tail()}")

    def eventually(self, check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Wait for ``check()`` to hold: for what the worker does after its job turned final."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{self.log_tail()}")
            time.sleep(0.1)

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


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """STUDIO_TEST_REDIS_URL, or a private redis-server (no persistence) for this test session."""
    global REDIS_URL
    if CONFIGURED_REDIS_URL:
        yield CONFIGURED_REDIS_URL
        return
    import socket

    import redis

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.exceptions.ConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the private redis-server on port {port} did not start")
            time.sleep(0.1)
    REDIS_URL = url
    try:
        yield url
    finally:
        server.terminate()  # the server this fixture started, by its own handle
        server.wait(timeout=30)


@pytest.fixture
def start_studio(settings: Settings, clean_db: Engine, monkeypatch: pytest.MonkeyPatch,
                 tmp_path: Path, redis_url: str) -> Iterator[Callable[..., Studio]]:
    """Starts a worker subprocess (once per test) on the chosen broker and returns the test's handle."""
    started: list[Studio] = []

    def start(broker: str = "redis", training: dict[str, Any] | None = None, host_var_dir: Path | None = None,
              empty_broker: bool = True, base_model: str = "tiny") -> Studio:
        """``host_var_dir``: the worker runs as if on another machine, with a var/ (scratch) of its own;
        ``base_model``: the built-in it trains."""
        broker_url = redis_url if broker == "redis" else ""
        if broker == "redis" and empty_broker:
            _empty_redis()
        web = settings.model_copy(update={"broker_url": broker_url, "media_dir": tmp_path / "media",
                                          "lease_seconds": 6})
        monkeypatch.setattr(config_module, "get_settings", lambda: web)
        values = web if host_var_dir is None else web.model_copy(update={"var_dir": host_var_dir})
        log_path = tmp_path / f"worker-{len(started)}.log"
        with log_path.open("wb") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker", "-Q", "gpu,cpu",
                 "-c", "1", "-l", "INFO", "-n", f"e2e-{uuid.uuid4().hex[:8]}@localhost", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=ROOT, env={**worker_env(values, training or FAST_TRAINING), "STUDIO_BASE_MODEL": base_model},
                stdout=log_file,
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


def test_a_studio_on_a_flow_matching_model_runs_to_done(start_studio: Callable[..., Studio]) -> None:
    # Z-Image's tiny built-in: a Qwen3 text encoder, a flow-matching transformer, through the same
    # worker, task and publishing as the UNet families.
    studio = start_studio("redis", base_model="tiny-zimage")
    job = studio.create_studio()
    done = studio.wait_finished(job.id)
    assert done.status == "done", f"{done.status}: {done.failure_reason}\n{studio.log_tail()}"
    assert (done.details["base_model"], done.details["family"]) == ("tiny-zimage", "zimage")
    assert len(studio.images_of(job.id)) == 2
    with studio.session() as session:
        subject = session.get(Subject, job.subject_id)
        assert subject is not None and subject.weights_key
        files = {key.rsplit("/", 1)[-1] for key in studio.storage.list(subject.weights_key)}
    assert {"pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"} <= files


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


def scrape_metrics(client: Any) -> dict[str, float]:
    """The samples of one /metrics scrape of the in-process web app, by name with labels."""
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert answer.status_code == 200, answer.text
    samples = {}
    for line in answer.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


METRICS_TOKEN = "metrics-token-for-the-test"


def test_cancel_during_training_stops_within_a_few_steps(start_studio: Callable[..., Studio]) -> None:
    """Also: /metrics, scraped from the web app while this worker trains, shows the queue length, the stage
    histograms and the worker's training speed (computed from the rows), and they change as the jobs move."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.models import WorkerHeartbeat

    studio = start_studio("redis", {"steps": 100_000, "checkpoint_every": 3, "preview_every": 0})

    def heartbeats() -> list[WorkerHeartbeat]:
        with studio.session() as session:
            return list(session.scalars(select(WorkerHeartbeat)))

    web = create_app(studio.settings.model_copy(update={"metrics_token": METRICS_TOKEN}))
    with TestClient(web) as client:
        studio.eventually(lambda: len(heartbeats()) == 1, "the worker's first heartbeat")
        worker = heartbeats()[0]
        assert worker.queues == ["cpu", "gpu"] and worker.current_job_id is None
        before = scrape_metrics(client)
        assert before['studio_queue_length{queue="gpu"}'] == 0
        assert before[f'studio_worker_up{{host="{worker.host}",worker="{worker.name}"}}'] == 1
        assert not any(name.startswith("studio_stage_duration_seconds_count") for name in before)

        job = studio.create_studio()
        waiting = studio.create_studio()  # behind the first: the worker runs one job at a time
        training = studio.wait_for(job.id, lambda j: j.stage == "training" and bool(j.details.get("checkpoint")),
                                   "training with a checkpoint")
        speed = f'studio_worker_training_steps_per_second{{worker="{worker.name}"}}'
        studio.eventually(lambda: speed in scrape_metrics(client), "the worker's training speed on /metrics")
        during = scrape_metrics(client)
        assert during['studio_queue_length{queue="gpu"}'] == 1
        assert during['studio_jobs{state="running"}'] == 1
        assert during[speed] > 0
        assert heartbeats()[0].current_job_id == job.id  # the job's child names it on its worker's row
        # Preparing and priors are over: the job recorded how long each took.
        assert during['studio_stage_duration_seconds_count{stage="preparing"}'] == 1
        assert during['studio_stage_duration_seconds_count{stage="priors"}'] == 1

        with studio.session() as session:
            found = session.get(Job, job.id)
            assert found is not None
            found.cancel_requested = True
            queued = session.get(Job, waiting.id)
            assert queued is not None and queued.status == "queued"
            queued.status, queued.cancel_requested = "cancelled", True
            session.commit()
            requested_at_step = max(training.step, found.step)
        cancelled = studio.wait_finished(job.id)
        after = scrape_metrics(client)
        assert after['studio_queue_length{queue="gpu"}'] == 0
        assert (after['studio_jobs{state="cancelled"}'], after['studio_jobs{state="running"}']) == (2, 0)
    assert cancelled.status == "cancelled", cancelled.failure_reason
    # The worker reads the flag every 0.3 s here. The tiny model makes ~40 steps a second, so "a few
    # steps" of a real model is a few hundred here; a missed flag would run to step 100 000.
    assert requested_at_step <= cancelled.step <= requested_at_step + 400, (requested_at_step, cancelled.step)
    assert studio.images_of(job.id) == []
    # Previews, checkpoints and the scratch folder go before the job's row says cancelled.
    leftovers = studio.storage.list(subject_prefix(job.owner_id, job.subject_id))
    assert all("/photos/" in key for key in leftovers), leftovers
    assert not (studio.settings.scratch_dir / str(job.id)).exists()


def test_a_killed_worker_child_resumes_from_its_checkpoint_and_publishes_once(
        start_studio: Callable[..., Studio]) -> None:
    # Long enough that the kill lands between the first checkpoint and the end on a slow machine too.
    # The kill lands at the first recorded checkpoint; the steps after it leave room for the poll's delay.
    studio = start_studio("redis", {"steps": 60, "checkpoint_every": 10, "preview_every": 0})
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
    # The redelivered task took over at once (its lease holder is dead on this host) or, on a machine so
    # slow that the redelivery came after the lease ran out, claimed the stale job the ordinary way.
    log = studio.log_tail(200_000)
    assert "redelivered; its lease holder" in log or log.count(f"job {job.id} claimed by") == 2
    # The scratch folder goes before the job turns done; the checkpoints only after (until the gallery is
    # committed, a new attempt may need them), so the test waits for those.
    assert not (studio.settings.scratch_dir / str(job.id)).exists()
    checkpoints = subject_prefix(job.owner_id, job.subject_id) + f"jobs/{job.id}/checkpoint/"
    studio.eventually(lambda: studio.storage.list(checkpoints) == [], "the checkpoints to be removed")


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


# --- a killed worker's copies of the photos (issue 10, item 6) ---------------------------------------

LONG_TRAINING = {"steps": 100_000, "checkpoint_every": 5, "preview_every": 0}


def _photos_of(studio: Studio, subject_id: uuid.UUID) -> list[bytes]:
    with studio.session() as session:
        keys = session.execute(select(Photo.storage_key).where(Photo.subject_id == subject_id)).scalars().all()
    return [studio.storage.get_bytes(key) for key in keys]


def _files_under(root: Path) -> list[Path]:
    """Every file under ``root``; folders removed during the walk are skipped (os.walk ignores them)."""
    return [Path(folder) / name for folder, _, names in os.walk(root) for name in names]


def photo_traces(root: Path, photos: list[bytes]) -> list[Path]:
    """Every file under ``root`` that holds one of ``photos``: its bytes, or an image of its exact pixels."""
    import hashlib
    import io

    import numpy as np
    from PIL import Image

    digests = {hashlib.sha256(photo).hexdigest() for photo in photos}
    pixels = [np.asarray(Image.open(io.BytesIO(photo)).convert("RGB")) for photo in photos]
    found = []
    for path in _files_under(root):
        try:
            data = path.read_bytes() if path.stat().st_size <= 64 * 1024 * 1024 else b""
        except OSError:
            continue  # removed while the walk went on (a sweep running meanwhile)
        if hashlib.sha256(data).hexdigest() in digests or any(photo in data for photo in photos):
            found.append(path)
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                decoded = np.asarray(image.convert("RGB"))
        except Exception:
            continue
        if any(decoded.shape == each.shape and np.array_equal(decoded, each) for each in pixels):
            found.append(path)
    return found


def _images_outside_the_prior_bank(var_dir: Path) -> list[Path]:
    """Image files under a var/ that are not class-prior images (the only ones that hold nothing personal)."""
    from PIL import Image

    left = []
    for path in _files_under(var_dir):
        if "prior-bank" not in path.relative_to(var_dir).parts:
            try:
                with Image.open(path):
                    left.append(path)
            except Exception:
                continue
    return left


def _delete(studio: Studio, subject_id: uuid.UUID) -> None:
    from app.subjects.deletion import delete_subject

    with studio.session() as session:
        subject = session.get(Subject, subject_id)
        assert subject is not None
        delete_subject(session, studio.storage, subject)
        session.commit()


def _training_with_copies(studio: Studio) -> tuple[Job, list[bytes]]:
    job = studio.create_studio()
    studio.wait_for(job.id, lambda j: j.stage == "training" and bool(j.details.get("checkpoint")),
                    "training with a checkpoint")
    return job, _photos_of(studio, job.subject_id)


def test_deleting_a_studio_whose_worker_was_killed_leaves_no_byte_of_its_photos(
        start_studio: Callable[..., Studio], tmp_path: Path) -> None:
    studio = start_studio("redis", LONG_TRAINING)  # one machine: the web and the worker share var/
    job, photos = _training_with_copies(studio)
    kill_and_wait(studio.worker)
    assert photo_traces(studio.settings.scratch_dir / str(job.id), photos), "the killed worker left no copy"

    _delete(studio, job.subject_id)
    assert photo_traces(tmp_path, photos) == []  # var/, the media folder, the logs: everything
    assert _images_outside_the_prior_bank(studio.settings.var_dir) == []


def test_a_killed_workers_scratch_on_another_machine_goes_when_that_worker_starts_again(
        start_studio: Callable[..., Studio], tmp_path: Path) -> None:
    host_b = tmp_path / "host-b"
    host_b.mkdir()
    studio = start_studio("redis", LONG_TRAINING, host_var_dir=host_b)
    job, photos = _training_with_copies(studio)
    kill_and_wait(studio.worker)
    _delete(studio, job.subject_id)  # the web's own sweep cannot reach host B, and nobody there is alive
    assert photo_traces(host_b, photos)

    again = start_studio("redis", LONG_TRAINING, host_var_dir=host_b)
    again.eventually(lambda: photo_traces(tmp_path, photos) == [], "the restarted worker's sweep", timeout=120)
    assert _images_outside_the_prior_bank(host_b) == []


def test_a_live_worker_sweeps_a_dead_attempts_scratch_when_a_studio_is_deleted(
        start_studio: Callable[..., Studio], tmp_path: Path) -> None:
    from tests.worker.test_scratch import plant_dead_attempt
    from worker.celery_app import SWEEP_SCRATCH_COMMAND, create_celery

    host_b = tmp_path / "host-b"
    studio = start_studio("redis", LONG_TRAINING, host_var_dir=host_b)
    wait_until_ready(studio.log_path, studio.worker, timeout=120)
    dead = plant_dead_attempt(studio.settings.scratch_dir)  # a process on host B killed with SIGKILL
    # What maintenance.purge_subject sends after a deletion: every worker's main process sweeps its host.
    replies = create_celery(studio.settings).control.broadcast(SWEEP_SCRATCH_COMMAND, reply=True, timeout=30,
                                                               limit=1)
    assert [list(reply.values()) for reply in replies] == [[{"removed": [str(dead)]}]]
    assert not (studio.settings.scratch_dir / str(dead)).exists()

