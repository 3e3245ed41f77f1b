"""Worker heartbeats: the main process's row (host, queues, GPU facts) and what a job's child writes on it."""

from __future__ import annotations

import subprocess
import uuid
from datetime import timedelta

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import WorkerHeartbeat, utcnow
from worker import heartbeat


def test_gpu_facts_come_from_nvidia_smi_and_none_without_it() -> None:
    asked: list[list[str]] = []

    def fake(command: list[str]) -> str:
        asked.append(command)
        return "NVIDIA H200, 2048, 143771, 87\n"

    facts = heartbeat.read_gpu(fake)
    assert facts == heartbeat.GpuFacts("NVIDIA H200", 2048 * 2**20, 143771 * 2**20, 87.0)
    assert asked[0][0] == "nvidia-smi"

    def failing(command: list[str]) -> str:
        raise subprocess.CalledProcessError(9, command)

    assert heartbeat.read_gpu(failing) is None
    assert heartbeat.read_gpu(lambda command: "garbage") is None


def test_the_row_is_upserted_and_a_childs_job_and_speed_land_on_it(clean_db: Engine) -> None:
    sessions = sessionmaker(bind=clean_db, expire_on_commit=False)
    beat = heartbeat.Heartbeat(sessions, ["gpu", "cpu"], 1.0, gpu=lambda: None)
    beat.beat_once()
    job_id = uuid.uuid4()
    with sessions.begin() as session:
        heartbeat.record_job(session, beat.name, job_id, 12.5)
        # A forgotten worker (not seen for a day) goes at the next beat.
        session.add(WorkerHeartbeat(name="old:1", host="old", pid=1, queues=[],
                                    last_seen_at=utcnow() - timedelta(days=2)))
    beat.beat_once()
    with Session(clean_db) as session:
        rows = session.scalars(select(WorkerHeartbeat)).all()
        assert [(r.name, r.queues, r.current_job_id, r.steps_per_second, r.gpu_name) for r in rows] == [
            (beat.name, ["cpu", "gpu"], job_id, 12.5, None)]
    with sessions.begin() as session:
        heartbeat.record_job(session, beat.name, None, None, finished_job=uuid.uuid4())  # another job: no change
        assert session.get(WorkerHeartbeat, beat.name).current_job_id == job_id  # type: ignore[union-attr]
        heartbeat.record_job(session, beat.name, None, None, finished_job=job_id)
    with Session(clean_db) as session:
        row = session.get(WorkerHeartbeat, beat.name)
        assert row is not None and row.current_job_id is None and row.steps_per_second == 12.5  # the last job's
