"""`studio up`'s maintenance worker, as a real process: it serves the maintenance queue on its own, so the
reaper runs while the job queue is busy (here: a job waits there that no process of this test takes), and it
never loads the engine."""

from __future__ import annotations

import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from app import cli, queue
from app import config as config_module
from app.config import Settings
from app.models import Job, utcnow
from app.storage import LocalStorage
from tests.worker.factories import make_job, make_subject, make_user
from tests.worker.processes import ROOT, base_worker_env, stop_worker, wait_until_ready
from worker.celery_app import create_celery

pytestmark = pytest.mark.slow


def test_the_maintenance_worker_reaps_while_the_job_queue_waits(settings: Settings, clean_db: Engine,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    web = settings.model_copy(update={"broker_url": "", "lease_seconds": 6})
    monkeypatch.setattr(config_module, "get_settings", lambda: web)
    storage = LocalStorage(web.resolved_media_dir)
    sessions = sessionmaker(bind=clean_db, expire_on_commit=False)
    with sessions() as session:
        owner = make_user(session)
        waiting = make_job(session, make_subject(session, storage, owner))
        queue.enqueue(session, "training.run", job_id=str(waiting.id))
        # A job whose worker died an hour ago: the reaper puts it back in line.
        an_hour_ago = utcnow() - timedelta(hours=1)
        lost = make_job(session, make_subject(session, storage, owner), status="running", stage="training",
                        attempts=1, heartbeat_at=an_hour_ago, started_at=an_hour_ago, lease_token="dead",
                        lease_holder="elsewhere:1")
        session.commit()

    # The maintenance worker exactly as `studio up` starts it, with a unique name for this test.
    command = cli.worker_command(["-Q", cli.MAINTENANCE_QUEUES, "-c", "1", "-n", f"maint-{uuid.uuid4().hex[:8]}@%h",
                                  "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"])
    log_path = tmp_path / "maintenance.log"
    with log_path.open("wb") as log_file:
        worker = subprocess.Popen(command, cwd=ROOT, env=base_worker_env(web), stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(log_path, worker, timeout=120)
        create_celery(web).send_task("maintenance.reap", queue=cli.MAINTENANCE_QUEUES)
        deadline = time.monotonic() + 120
        while True:
            with sessions() as session:
                found = session.get(Job, lost.id)
                assert found is not None
                if found.status == "queued":
                    break
            assert time.monotonic() < deadline, f"the reaper did not run\n{log_path.read_text()[-4000:]}"
            time.sleep(0.2)
        with sessions() as session:
            assert session.get(Job, waiting.id).status == "queued"  # type: ignore[union-attr]
        log = log_path.read_text(errors="replace")
        assert "maintenance.reap" in log
        assert "training.run[" not in log and "PyTorch CPU thread" not in log  # no job, no engine in this process
    finally:
        stop_worker(worker)
