"""The storage reconciler on both backends: unreferenced old objects go, referenced and young ones stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import GeneratedImage, PriorBank, Subject, utcnow
from app.storage import Storage, make_storage
from app.storage.base import (
    checkpoint_prefix,
    image_key,
    preview_key,
    prior_bank_prefix,
    subject_prefix,
    weights_prefix,
)
from app.storage.reconcile import reconcile_storage
from tests.worker.factories import make_job, make_subject, make_user

ROOT = Path(__file__).resolve().parents[3]
HOUR = 3600


def later(hours: float) -> datetime:
    return utcnow() + timedelta(hours=hours)


def test_unreferenced_old_objects_go_and_referenced_young_or_running_ones_stay(
        any_storage: Storage, db_session: Session) -> None:
    storage = any_storage
    owner = make_user(db_session)
    rex = make_subject(db_session, storage, owner, photos=2)
    done = make_job(db_session, rex, status="done")
    image_id = uuid.uuid4()
    kept = [image_key(owner.id, rex.id, image_id), preview_key(owner.id, rex.id, done.id, "a1-p.png"),
            weights_prefix(owner.id, rex.id) + f"{done.id}-1/pytorch_lora_weights.safetensors"]
    db_session.add(GeneratedImage(id=image_id, subject_id=rex.id, job_id=done.id, storage_key=kept[0], prompt="p",
                                  prompt_template="p", seed=1, steps=1, guidance=1.0, width=8, height=8))
    done.preview_keys = [kept[1]]
    rex.weights_key = weights_prefix(owner.id, rex.id) + f"{done.id}-1/"
    waiting = make_job(db_session, rex, status="queued", attempts=1)
    waiting_checkpoint = checkpoint_prefix(owner.id, rex.id, waiting.id) + "a1-step000010/"
    waiting.details = {"checkpoint": {"prefix": waiting_checkpoint, "path": "c", "step": 10}}
    kept.append(waiting_checkpoint + "state.json")
    failed = make_job(db_session, rex, status="failed", failure_reason="x",
                      details={"checkpoint": {"prefix": checkpoint_prefix(owner.id, rex.id, uuid.uuid4()), "step": 5}})
    bank = prior_bank_prefix("bank-1")
    db_session.add(PriorBank(key="bank-1", model_fingerprint="fp", class_prompt="a photo of a dog", resolution=64,
                             sampler="s", steps=4, guidance=7.5, image_count=1, storage_prefix=bank))
    kept.append(bank + "00000.png")
    tom = make_subject(db_session, storage, owner, photos=1, name="Tom")
    make_job(db_session, tom, status="running", attempts=1, lease_token="t")
    kept.append(subject_prefix(owner.id, tom.id) + "images/being-uploaded.png")  # its worker is running
    kept.append("someone-elses/file.txt")  # not the studio's key space
    orphans = [
        weights_prefix(owner.id, rex.id) + f"{done.id}-2/pytorch_lora_weights.safetensors",  # a publish that failed
        image_key(owner.id, rex.id, uuid.uuid4()),
        checkpoint_prefix(owner.id, rex.id, failed.id) + "a3-step000005/state.json",  # a failed job resumes nothing
        preview_key(owner.id, rex.id, failed.id, "a3-p.png"),
        prior_bank_prefix("bank-without-a-row") + "00000.png",
        f"users/{uuid.uuid4()}/subjects/{uuid.uuid4()}/photos/{uuid.uuid4()}.jpg",  # a studio never committed
    ]
    for key in kept + orphans:
        storage.put_bytes(key, b"data")
    db_session.commit()
    before = set(storage.list(""))

    young = reconcile_storage(db_session, storage, HOUR)
    assert young.removed_count == 0 and young.kept_young >= len(kept) + len(orphans)

    report = reconcile_storage(db_session, storage, HOUR, now=later(2))
    assert sorted(report.removed) == sorted(orphans) and report.removed_count == len(orphans)
    assert report.removed_bytes == 4 * len(orphans) and report.failed == 0
    assert all(storage.exists(key) for key in kept)
    photo_keys = [key for key in storage.list(subject_prefix(owner.id, rex.id)) if "/photos/" in key]
    assert len(photo_keys) == 2  # referenced by their rows
    assert not any(storage.exists(key) for key in orphans)
    assert set(storage.list("")) == before - set(orphans)  # nothing else went
    assert report.as_dict()["removed"] == len(orphans)


KILLED_WEB = """
import os, signal, sys, uuid
from sqlalchemy.orm import sessionmaker
from app.config import Settings
from app.db import make_engine
from app.models import User
from app.storage import make_storage
from app.subjects.schemas import CreateStudio
from app.subjects.service import create_studio
from tests.app.photo_factory import make_photos

settings = Settings()
session = sessionmaker(bind=make_engine(settings.resolved_database_url))()
owner = session.get(User, uuid.UUID(sys.argv[1]))
create_studio(session, make_storage(settings), settings, owner,
              CreateStudio(name="Rex", kind="dog", consent=True), make_photos(3))
print("stored", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the web dies before its transaction commits
"""


def _environment(settings: Settings) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("STUDIO_")}
    env.update({"PYTHONPATH": str(ROOT), "STUDIO_ENVIRONMENT": "test", "STUDIO_SECRET_KEY": settings.secret_key,
                "STUDIO_VAR_DIR": str(settings.var_dir), "STUDIO_DATABASE_URL": settings.resolved_database_url,
                "STUDIO_STORAGE_BACKEND": settings.storage_backend,
                "STUDIO_MEDIA_DIR": str(settings.resolved_media_dir)})
    if settings.storage_backend == "s3":
        env.update({"STUDIO_S3_ENDPOINT_URL": str(settings.s3_endpoint_url), "STUDIO_S3_BUCKET": settings.s3_bucket,
                    "STUDIO_S3_REGION": settings.s3_region, "STUDIO_S3_ACCESS_KEY": str(settings.s3_access_key),
                    "STUDIO_S3_SECRET_KEY": str(settings.s3_secret_key)})
    return env


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_photos_of_a_studio_whose_web_died_before_the_commit_are_removed(
        backend: str, settings: Settings, db_session: Session, request: pytest.FixtureRequest) -> None:
    if backend == "s3":
        request.getfixturevalue("s3_storage")  # creates the bucket
        settings = request.getfixturevalue("s3_settings")
    storage = make_storage(settings)
    owner = make_user(db_session)
    committed = make_subject(db_session, storage, owner, photos=2)  # an earlier studio of the same account
    db_session.commit()

    web = subprocess.run([sys.executable, "-c", KILLED_WEB, str(owner.id)], cwd=ROOT, env=_environment(settings),
                         capture_output=True, text=True, timeout=120, check=False)
    assert web.returncode == -signal.SIGKILL and "stored" in web.stdout, web.stderr
    db_session.expire_all()
    subjects = db_session.execute(select(Subject.id).where(Subject.owner_id == owner.id)).scalars().all()
    assert subjects == [committed.id]  # the new studio's rows were never committed...
    stranded = [key for key in storage.list(f"users/{owner.id}/")
                if not key.startswith(subject_prefix(owner.id, committed.id))]
    assert len(stranded) == 3 and all("/photos/" in key for key in stranded)  # ...but its photos were stored

    assert reconcile_storage(db_session, storage, HOUR).removed == []  # an hour has not passed yet
    report = reconcile_storage(db_session, storage, HOUR, now=later(1.1))
    assert sorted(report.removed) == sorted(stranded)
    assert storage.list(f"users/{owner.id}/") == sorted(storage.list(subject_prefix(owner.id, committed.id)))
    assert len(storage.list(subject_prefix(owner.id, committed.id))) == 2


def test_the_task_reports_what_it_removed(settings: Settings, db_session: Session, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import settings as worker_settings_module
    from worker.tasks.maintenance import reconcile_storage_task

    worker_settings_module.get_worker_settings.cache_clear()
    monkeypatch.setenv("STUDIO_ORPHAN_MIN_AGE_SECONDS", "0")
    storage = make_storage(settings)
    stray = f"users/{uuid.uuid4()}/subjects/{uuid.uuid4()}/photos/{uuid.uuid4()}.jpg"
    storage.put_bytes(stray, b"jpeg")
    old = (utcnow() - timedelta(seconds=5)).timestamp()
    os.utime(settings.resolved_media_dir / stray, (old, old))
    try:
        with caplog.at_level("INFO", logger="app.storage.reconcile"):
            result = reconcile_storage_task()
    finally:
        worker_settings_module.get_worker_settings.cache_clear()
    assert result["removed"] == 1 and result["removed_keys"] == [stray] and result["removed_bytes"] == 4
    assert not storage.exists(stray)
    assert f"removed 1 unreferenced objects (4 bytes) older than 0 s: {stray}" in caplog.text
