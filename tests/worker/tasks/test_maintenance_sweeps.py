"""The scratch sweeps the maintenance tasks run: the reaper's (with the database's view) and the purge's
(this host, then a broadcast to every worker)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from app.config import Settings
from app.storage import LocalStorage
from tests.worker.factories import make_job, make_subject, make_user
from tests.worker.test_scratch import plant_dead_attempt
from worker import settings as worker_settings_module
from worker.scratch import OWNER_FILE, scratch_path
from worker.tasks import maintenance


@pytest.fixture(autouse=True)
def fresh_worker_settings(settings: Settings) -> Iterator[None]:
    worker_settings_module.get_worker_settings.cache_clear()
    yield
    worker_settings_module.get_worker_settings.cache_clear()


def owned_elsewhere(settings: Settings, job_id: uuid.UUID) -> None:
    folder = scratch_path(settings.scratch_dir, job_id)
    folder.mkdir(parents=True)
    (folder / OWNER_FILE).write_text(json.dumps({"host": "gpu-box-2", "pid": 4242, "started": None,
                                                 "job_id": str(job_id)}))


def test_the_reaper_sweeps_dead_attempts_and_ended_jobs(settings: Settings, db_session: Session,
                                                        storage: LocalStorage) -> None:
    subject = make_subject(db_session, storage, make_user(db_session), photos=1)
    ended = make_job(db_session, subject, status="failed", failure_reason="x")
    running = make_job(db_session, subject, status="running", attempts=1, lease_token="t")
    db_session.commit()
    dead = plant_dead_attempt(settings.scratch_dir)
    owned_elsewhere(settings, ended.id)
    owned_elsewhere(settings, running.id)

    counts = maintenance.reap_task()
    assert counts["scratch_removed"] == 2
    assert not scratch_path(settings.scratch_dir, dead).exists()
    assert not scratch_path(settings.scratch_dir, ended.id).exists()
    assert scratch_path(settings.scratch_dir, running.id).is_dir()  # its worker elsewhere may be alive


def test_the_purge_after_a_deletion_sweeps_this_host_and_asks_every_worker_to(
        settings: Settings, db_session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    broadcasts: list[bool] = []
    monkeypatch.setattr(maintenance, "broadcast_scratch_sweep", lambda: broadcasts.append(True))
    dead = plant_dead_attempt(settings.scratch_dir)
    assert maintenance.purge_subject_task(str(uuid.uuid4()), str(uuid.uuid4())) == 0
    assert not scratch_path(settings.scratch_dir, dead).exists()
    assert broadcasts == [True]
