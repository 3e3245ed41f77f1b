"""Deleting a studio leaves no file of it in storage and no row that points to it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import queue
from app.config import Settings
from app.models import GeneratedImage, GenerationRequest, Job, Photo, Subject, utcnow
from app.storage import LocalStorage
from app.storage.base import checkpoint_prefix, image_key, preview_key, subject_prefix, weights_prefix, zip_key
from app.subjects.deletion import delete_subject, purge_subject_files
from tests.worker.factories import make_job, make_subject, make_user

Sent = list[tuple[str, dict[str, str], str]]


@pytest.fixture
def sent() -> Iterator[Sent]:
    captured: Sent = []
    queue.set_sender(lambda name, kwargs, queue_name: captured.append((name, kwargs, queue_name)))
    yield captured
    queue.set_sender(None)


def count(session: Session, model: type, subject_id: uuid.UUID) -> int:
    return int(session.execute(select(func.count()).select_from(model).where(
        model.subject_id == subject_id)).scalar_one())  # type: ignore[attr-defined]


def test_delete_subject_removes_every_file_and_row_and_stops_its_jobs(db_session: Session, storage: LocalStorage,
                                                                      sent: Sent) -> None:
    owner = make_user(db_session)
    subject = make_subject(db_session, storage, owner, photos=3)
    keeper = make_subject(db_session, storage, owner, photos=2)
    done = make_job(db_session, subject, status="done")
    running = make_job(db_session, subject, status="running", lease_token="t", attempts=1)
    generate = make_job(db_session, subject, kind="generate")
    db_session.add(GenerationRequest(subject_id=subject.id, job_id=generate.id, prompts=["x {subject}"]))
    image_id = uuid.uuid4()
    db_session.add(GeneratedImage(id=image_id, subject_id=subject.id, job_id=done.id,
                                  storage_key=image_key(owner.id, subject.id, image_id), prompt="p",
                                  prompt_template="p", seed=1, steps=1, guidance=1.0, width=8, height=8))
    for key in (image_key(owner.id, subject.id, image_id), preview_key(owner.id, subject.id, running.id, "p.png"),
                checkpoint_prefix(owner.id, subject.id, running.id) + "state.pt",
                weights_prefix(owner.id, subject.id) + "x/pytorch_lora_weights.safetensors",
                zip_key(owner.id, subject.id, "gallery.zip")):
        storage.put_bytes(key, b"data")
    db_session.commit()
    running_id, subject_id = running.id, subject.id

    delete_subject(db_session, storage, subject)
    assert sent == []
    db_session.commit()

    assert storage.list(subject_prefix(owner.id, subject_id)) == []
    db_session.expire_all()
    for model in (Photo, Job, GeneratedImage, GenerationRequest):
        assert count(db_session, model, subject_id) == 0
    assert db_session.get(Subject, subject_id) is None and db_session.get(Job, running_id) is None
    # The other studio of the same account is untouched.
    assert len(storage.list(subject_prefix(owner.id, keeper.id))) == 2 and count(db_session, Photo, keeper.id) == 2
    assert sent == [("maintenance.purge_subject", {"owner_id": str(owner.id), "subject_id": str(subject_id)}, "cpu")]


def test_purge_deletes_files_a_worker_wrote_after_the_deletion(db_session: Session, storage: LocalStorage,
                                                                sent: Sent) -> None:
    owner = make_user(db_session)
    subject = make_subject(db_session, storage, owner, photos=1)
    db_session.commit()
    owner_id, subject_id = owner.id, subject.id
    delete_subject(db_session, storage, subject)
    db_session.commit()
    late = preview_key(owner_id, subject_id, uuid.uuid4(), "late.png")
    storage.put_bytes(late, b"png")
    assert purge_subject_files(db_session, storage, str(owner_id), str(subject_id)) == 1
    assert not storage.exists(late)


def test_purge_leaves_a_live_subject_alone(db_session: Session, storage: LocalStorage) -> None:
    subject = make_subject(db_session, storage, make_user(db_session), photos=2, expires_at=utcnow())
    db_session.commit()
    assert purge_subject_files(db_session, storage, str(subject.owner_id), str(subject.id)) == 0
    assert len(storage.list(subject_prefix(subject.owner_id, subject.id))) == 2


def test_delete_subject_sweeps_the_scratch_a_killed_worker_left_on_this_machine(
        db_session: Session, storage: LocalStorage, settings: Settings, sent: Sent) -> None:
    from tests.worker.test_scratch import plant_dead_attempt
    from worker.scratch import scratch_folder, scratch_path

    subject = make_subject(db_session, storage, make_user(db_session), photos=1)
    db_session.commit()
    dead = plant_dead_attempt(settings.scratch_dir)  # copies of photos, its process killed with SIGKILL
    with scratch_folder(settings.scratch_dir, uuid.uuid4()) as live:
        delete_subject(db_session, storage, subject)
        db_session.commit()
        assert not scratch_path(settings.scratch_dir, dead).exists()
        assert live.is_dir()  # a live run removes its own folder
