"""The training task's attempt logic with a fake engine: publish, cancel, lease loss, resume, failures."""

from __future__ import annotations

import errno
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import lease
from app.models import GeneratedImage, Job, Photo, PriorBank, Subject, utcnow
from app.storage import LocalStorage, StorageError
from app.storage.base import subject_prefix
from tests.worker.factories import make_job, make_subject, make_user
from tests.worker.fakes import FakeEngine
from worker.engine.errors import EngineInputError, PhotosUnusable, TrainingDiverged
from worker.engine.spec import JobSpec
from worker.tasks.engine_adapter import lighter_training
from worker.tasks.outcomes import is_disk_full
from worker.tasks.runtime import WorkerContext
from worker.tasks.training import rank_images, run_training_job


class WorkerDied(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of the task catches it."""


def new_job(ctx: WorkerContext, storage: LocalStorage, **subject_fields: object) -> Job:
    with ctx.transaction() as session:
        subject = make_subject(session, storage, make_user(session), **subject_fields)  # type: ignore[arg-type]
        job = make_job(session, subject)
    return job


def load(ctx: WorkerContext, job: Job) -> tuple[Job, Subject | None, list[GeneratedImage], list[Photo]]:
    with ctx.transaction() as session:
        fresh = session.get(Job, job.id)
        assert fresh is not None
        subject = session.get(Subject, job.subject_id)
        images = list(session.execute(select(GeneratedImage).where(GeneratedImage.job_id == job.id)).scalars())
        photos = list(session.execute(select(Photo).where(Photo.subject_id == job.subject_id)).scalars())
    return fresh, subject, images, photos


def subject_files(storage: LocalStorage, job: Job, folder: str = "") -> list[str]:
    return storage.list(subject_prefix(job.owner_id, job.subject_id) + folder)


def test_a_job_runs_to_done_and_publishes_images_weights_and_facts(ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)
    assert run_training_job(job.id, ctx=ctx, engine=FakeEngine()) == "done"
    done, subject, images, photos = load(ctx, job)
    assert (done.status, done.stage, done.attempts) == ("done", "finished", 1)
    assert done.finished_at is not None and done.failure_reason is None
    assert len(images) == 2 and all(storage.exists(image.storage_key) for image in images)
    assert {image.prompt_template for image in images} == {"a photo of {subject} on the beach",
                                                          "a photo of {subject} in the snow"}
    assert sorted(image.rank for image in images if image.rank is not None) == [1, 2]
    assert all(image.width == 24 and image.dino is not None for image in images)
    assert subject is not None and subject.identifier == "qzx" and subject.base_model == "tiny"
    assert subject.weights_key and storage.exists(subject.weights_key + "pytorch_lora_weights.safetensors")
    assert not [key for key in storage.list(subject.weights_key) if "checkpoints" in key]
    details = done.details
    assert details["prior_generated"] == 3 and details["prior_reused"] == 0
    assert details["demo_model"] is True and details["base_model"] == "tiny"
    assert details["loss_history"] == pytest.approx([1.0 / step for step in range(1, 7)], abs=1e-5)
    assert details["images_done"] == details["images_total"] == 2
    # Photos are removed after training (files and rows); checkpoints are gone; previews stay listed.
    assert photos == [] and subject.photos_deleted_at is not None
    assert subject_files(storage, job, "photos/") == []
    assert subject_files(storage, job, f"jobs/{job.id}/checkpoint/") == []
    assert done.preview_keys and all(storage.exists(key) for key in done.preview_keys)
    # The prior bank went to storage with its row; the scratch folder is gone.
    bank_keys = storage.list("priors/")
    assert sum(key.endswith(".png") for key in bank_keys) == 3
    assert not (ctx.settings.scratch_dir / str(job.id)).exists()


def test_a_second_studio_of_the_same_class_reuses_the_bank_from_storage(ctx: WorkerContext, storage: LocalStorage,
                                                                         tmp_path: object) -> None:
    first = new_job(ctx, storage)
    assert run_training_job(first.id, ctx=ctx, engine=FakeEngine()) == "done"
    # Another worker: an empty local cache, the same storage and database.
    other = WorkerContext(settings=ctx.settings.model_copy(update={"prior_cache_dir": ctx.settings.var_dir / "w2"}),
                          storage=ctx.storage, sessions=ctx.sessions, worker_id="w2")
    second = new_job(ctx, storage)
    assert run_training_job(second.id, ctx=other, engine=FakeEngine()) == "done"
    done, *_ = load(ctx, second)
    assert done.details["prior_generated"] == 0 and done.details["prior_reused"] == 3
    with ctx.transaction() as session:
        banks = list(session.execute(select(PriorBank)).scalars())
    assert len(banks) == 1 and banks[0].image_count == 3 and banks[0].class_prompt == "a photo of a dog"


def test_cancel_during_training_ends_cancelled_and_removes_partial_files(ctx: WorkerContext,
                                                                         storage: LocalStorage) -> None:
    job = new_job(ctx, storage)

    def request_cancel(step: int) -> None:
        if step == 4:
            with ctx.transaction() as session:
                found = session.get(Job, job.id)
                assert found is not None
                found.cancel_requested = True

    engine = FakeEngine(steps=20, on_step=request_cancel)
    assert run_training_job(job.id, ctx=ctx, engine=engine) == "cancelled"
    cancelled, subject, images, photos = load(ctx, job)
    assert cancelled.status == "cancelled" and cancelled.step <= 5
    assert images == [] and cancelled.preview_keys == [] and "checkpoint" not in cancelled.details
    assert subject_files(storage, job, f"jobs/{job.id}/") == []
    assert not [key for key in subject_files(storage, job) if "/weights/" in key or "/images/" in key]
    assert len(photos) == 4  # nothing was trained, so the photos stay
    assert not (ctx.settings.scratch_dir / str(job.id)).exists()


def test_an_attempt_that_lost_its_lease_publishes_nothing(ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)
    thief: list[str] = []

    def steal(step: int) -> None:
        if step == 3:
            with ctx.transaction() as session:
                found = session.get(Job, job.id)
                assert found is not None
                found.heartbeat_at = utcnow().replace(year=2000)
            with ctx.transaction() as session:
                token = lease.claim(session, job.id, "thief", ctx.settings.lease_seconds)
            assert token is not None
            thief.append(token)

    assert run_training_job(job.id, ctx=ctx, engine=FakeEngine(steps=10, on_step=steal)) == "lost"
    stolen, subject, images, photos = load(ctx, job)
    assert (stolen.status, stolen.lease_token, stolen.attempts) == ("running", thief[0], 2)
    assert images == [] and subject is not None and subject.weights_key is None and len(photos) == 4
    assert not [key for key in subject_files(storage, job) if "/weights/" in key or "/images/" in key]
    # What the first attempt recorded before it lost (its checkpoint) stays for the new holder.
    checkpoint = stolen.details["checkpoint"]
    assert storage.list(checkpoint["prefix"])


def test_a_job_resumes_from_its_checkpoint_after_its_worker_died(ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)

    def die(step: int) -> None:
        if step == 5:
            raise WorkerDied()

    with pytest.raises(WorkerDied):
        run_training_job(job.id, ctx=ctx, engine=FakeEngine(steps=8, on_step=die))
    # The scratch folder went with the "worker"; the checkpoint of step 4 is in storage.
    assert not (ctx.settings.scratch_dir / str(job.id)).exists()
    with ctx.transaction() as session:
        found = session.get(Job, job.id)
        assert found is not None and found.details["checkpoint"]["step"] == 4
        found.heartbeat_at = utcnow().replace(year=2000)  # the lease went stale
    engine = FakeEngine(steps=8)
    assert run_training_job(job.id, ctx=ctx, engine=engine) == "done"
    assert engine.started_at_steps == [4]
    done, _, images, _ = load(ctx, job)
    assert done.attempts == 2 and done.details["resumed_from"] == 4 and len(images) == 2
    assert "checkpoint" not in done.details
    assert subject_files(storage, job, f"jobs/{job.id}/checkpoint/") == []


def test_a_duplicate_delivery_exits_at_the_claim(ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)
    with ctx.transaction() as session:
        assert lease.claim(session, job.id, "live-worker", ctx.settings.lease_seconds)
    engine = FakeEngine()
    assert run_training_job(job.id, ctx=ctx, engine=engine) == "skipped"
    assert engine.calls == []
    running, *_ = load(ctx, job)
    assert running.attempts == 1 and running.status == "running"


def test_a_delivery_after_the_last_attempt_ends_the_job_failed(ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)
    with ctx.transaction() as session:
        found = session.get(Job, job.id)
        assert found is not None
        found.status, found.attempts, found.heartbeat_at = "running", 3, utcnow().replace(year=2000)
    assert run_training_job(job.id, ctx=ctx, engine=FakeEngine()) == "skipped"
    failed, *_ = load(ctx, job)
    assert failed.status == "failed" and "stopped unexpectedly 3 times" in (failed.failure_reason or "")


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PhotosUnusable("photo 2 is too blurry"), "Some photos could not be used: photo 2 is too blurry"),
        (EngineInputError("unknown base model 'x'"), "The studio could not start this job: unknown base model 'x'"),
        (TrainingDiverged("nan"), "Training diverged (the loss became NaN); try the fast preset or fewer steps."),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "The GPU ran out of memory"),
        (OSError(errno.ENOSPC, "No space left on device"), "The worker's disk is full"),
        (ValueError("something internal"), "Something went wrong in the worker"),
    ],
)
def test_failures_end_with_a_reason_a_person_understands(ctx: WorkerContext, storage: LocalStorage,
                                                         error: BaseException, reason: str) -> None:
    job = new_job(ctx, storage)
    assert run_training_job(job.id, ctx=ctx, engine=FakeEngine(steps=6, fail_with=error)) == "failed"
    failed, subject, images, photos = load(ctx, job)
    assert failed.status == "failed" and (failed.failure_reason or "").startswith(reason)
    assert images == [] and len(photos) == 4 and subject is not None and subject.weights_key is None
    assert subject_files(storage, job, f"jobs/{job.id}/checkpoint/") == [] and "checkpoint" not in failed.details
    assert not (ctx.settings.scratch_dir / str(job.id)).exists()


OUT_OF_MEMORY = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_running_out_of_gpu_memory_once_finishes_with_lighter_settings(ctx: WorkerContext,
                                                                       storage: LocalStorage) -> None:
    job = new_job(ctx, storage)
    engine = FakeEngine(steps=6, checkpoint_every=2, fail_with=OUT_OF_MEMORY, fail_times=1)
    assert run_training_job(job.id, ctx=ctx, engine=engine) == "done"
    first, second = engine.inputs_seen
    assert isinstance(first, JobSpec) and isinstance(second, JobSpec)
    assert not first.train_overrides.get("gradient_checkpointing") and first.batch_size == 4
    assert second.train_overrides["gradient_checkpointing"] is True and second.batch_size == 1
    assert engine.memory_freed == 1
    assert engine.started_at_steps == [0, 2]  # the lighter run went on from the heavier one's checkpoint
    done, _subject, images, _photos = load(ctx, job)
    assert done.details["memory_fallback"] == ["gradient checkpointing", "one image per sampling call"]
    assert len(images) > 0 and done.attempts == 1


def test_running_out_of_memory_again_fails_after_one_lighter_try(ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)
    engine = FakeEngine(steps=6, fail_with=OUT_OF_MEMORY)
    assert run_training_job(job.id, ctx=ctx, engine=engine) == "failed"
    assert engine.calls.count("train") == 2
    failed, *_ = load(ctx, job)
    assert (failed.failure_reason or "").startswith("The GPU ran out of memory")


def test_other_errors_are_not_retried_lighter(ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)
    engine = FakeEngine(steps=6, fail_with=ValueError("something internal"), fail_times=1)
    assert run_training_job(job.id, ctx=ctx, engine=engine) == "failed"
    assert engine.calls.count("train") == 1 and engine.memory_freed == 0


def test_nothing_left_to_lighten() -> None:
    lightest = JobSpec(photos=[], class_noun="dog", subject_kind="pet", work_dir=Path("w"), bank_root=Path("b"),
                       train_overrides={"gradient_checkpointing": True}, batch_size=1)
    assert lighter_training(lightest) is None
    lightened = lighter_training(replace(lightest, batch_size=4))
    assert lightened is not None and lightened[1] == ["one image per sampling call"]


def test_a_full_disk_is_named_even_behind_a_storage_error() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as disk:
            raise StorageError("could not write users/x/weights/run.json") from disk
    except StorageError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_missing_photos_fail_the_job_clearly(ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage)
    storage.delete_prefix(subject_prefix(job.owner_id, job.subject_id) + "photos/")
    assert run_training_job(job.id, ctx=ctx, engine=FakeEngine()) == "failed"
    failed, *_ = load(ctx, job)
    assert "photos are no longer available" in (failed.failure_reason or "")


def test_deleting_the_subject_mid_run_stops_the_worker_and_leaves_no_file(ctx: WorkerContext,
                                                                          storage: LocalStorage) -> None:
    job = new_job(ctx, storage)

    def delete_now(step: int) -> None:
        if step == 3:
            from app.subjects.deletion import delete_subject

            with ctx.transaction() as session:
                subject = session.get(Subject, job.subject_id)
                assert subject is not None
                delete_subject(session, storage, subject)

    from app import queue

    queue.set_sender(lambda *args: None)
    try:
        outcome = run_training_job(job.id, ctx=ctx, engine=FakeEngine(steps=10, on_step=delete_now))
    finally:
        queue.set_sender(None)
    assert outcome == "deleted"
    assert subject_files(storage, job) == []
    with ctx.transaction() as session:
        assert session.get(Job, job.id) is None


def test_deleting_the_account_mid_run_stops_the_worker_and_leaves_no_file_or_row(ctx: WorkerContext,
                                                                                 storage: LocalStorage) -> None:
    from app.accounts.deletion import delete_account, user_prefix
    from app.models import User
    from tests.app.accounts.test_deletion import rows_pointing_to

    job = new_job(ctx, storage)

    def delete_now(step: int) -> None:
        if step == 3:
            with ctx.transaction() as session:
                owner = session.get(User, job.owner_id)
                assert owner is not None
                delete_account(session, storage, ctx.settings, owner)

    from app import queue

    queue.set_sender(lambda *args: None)
    try:
        outcome = run_training_job(job.id, ctx=ctx, engine=FakeEngine(steps=10, on_step=delete_now))
    finally:
        queue.set_sender(None)
    # The worker found its job gone, stopped, and removed what it had written; no row of the account is left.
    assert outcome == "deleted"
    assert storage.list(user_prefix(job.owner_id)) == []
    with ctx.transaction() as session:
        assert rows_pointing_to(session, job.owner_id) == {}


def test_a_person_studio_stores_each_pictures_face_match(ctx: WorkerContext, storage: LocalStorage) -> None:
    job = new_job(ctx, storage, kind="person", class_noun="woman")
    assert run_training_job(job.id, ctx=ctx, engine=FakeEngine()) == "done"
    _, _, images, _ = load(ctx, job)
    by_file = sorted(images, key=lambda image: image.seed)
    assert [(image.face_checked, image.face_distance) for image in by_file] == [(True, None), (True, 0.5)]
    dog = new_job(ctx, storage)
    assert run_training_job(dog.id, ctx=ctx, engine=FakeEngine()) == "done"
    assert all(not image.face_checked and image.face_distance is None for image in load(ctx, dog)[2])


def test_rank_images_orders_by_likeness_and_leaves_unscored_images_unranked() -> None:
    from tests.worker.fakes import FakeScores

    scores = [FakeScores(0.2, 0.5, 0.1), FakeScores(0.9, 0.1, 0.1), FakeScores(None, None, None)]
    assert rank_images(scores, 3) == [2, 1, 3]
    assert rank_images([], 2) == [None, None]


def _unused(_: Callable[[], None], __: Session, ___: uuid.UUID) -> None:  # keeps imports honest for mypy
    return None


def test_a_redelivery_after_a_lost_worker_waits_for_the_dead_lease_and_takes_over(ctx: WorkerContext,
                                                                                  storage: LocalStorage) -> None:
    quick = WorkerContext(settings=ctx.settings.model_copy(update={"lease_seconds": 2}), storage=ctx.storage,
                          sessions=ctx.sessions, worker_id="w2")
    job = new_job(quick, storage)
    with quick.transaction() as session:
        assert lease.claim(session, job.id, "dead-worker", 2)  # claimed, then never heard of again
    assert run_training_job(job.id, ctx=quick, engine=FakeEngine(), redelivered=True) == "done"
    done, *_ = load(quick, job)
    assert done.attempts == 2 and done.status == "done"


def test_a_redelivery_of_a_job_whose_worker_is_alive_exits(ctx: WorkerContext, storage: LocalStorage) -> None:
    import threading

    quick = WorkerContext(settings=ctx.settings.model_copy(update={"lease_seconds": 2}), storage=ctx.storage,
                          sessions=ctx.sessions, worker_id="w2")
    job = new_job(quick, storage)
    with quick.transaction() as session:
        token = lease.claim(session, job.id, "live-worker", 2)
    assert token is not None
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.3):
            with quick.transaction() as session:
                lease.heartbeat(session, job.id, token)

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        assert run_training_job(job.id, ctx=quick, engine=FakeEngine(), redelivered=True) == "skipped"
    finally:
        stop.set()
        beating.join()
    running, *_ = load(quick, job)
    assert running.attempts == 1 and running.lease_token == token


def test_a_failed_progress_write_never_deletes_the_checkpoint_the_database_records(
        ctx: WorkerContext, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    from worker.tasks import runtime

    job = new_job(ctx, storage)
    real_update = lease.update_progress

    def database_away_for_step_4(session: Session, job_id: uuid.UUID, token: str, **values: object) -> bool:
        details = values.get("details")
        if isinstance(details, dict) and details.get("checkpoint", {}).get("step") == 4:
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))
        return real_update(session, job_id, token, **values)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime.lease, "update_progress", database_away_for_step_4)

    def die(step: int) -> None:
        if step == 5:
            raise WorkerDied()

    with pytest.raises(WorkerDied):
        run_training_job(job.id, ctx=ctx, engine=FakeEngine(steps=8, checkpoint_every=2, on_step=die))
    monkeypatch.setattr(runtime.lease, "update_progress", real_update)
    with ctx.transaction() as session:
        found = session.get(Job, job.id)
        assert found is not None
        recorded = found.details["checkpoint"]
        found.heartbeat_at = utcnow().replace(year=2000)  # the lease went stale
    # The write that would have recorded step 4 failed: the database still points at step 2, and it is whole.
    assert recorded["step"] == 2 and storage.list(recorded["prefix"])
    engine = FakeEngine(steps=8, checkpoint_every=2)
    assert run_training_job(job.id, ctx=ctx, engine=engine) == "done"
    assert engine.started_at_steps == [2]
    done, *_ = load(ctx, job)
    assert done.details["resumed_from"] == 2
    assert subject_files(storage, job, f"jobs/{job.id}/checkpoint/") == []


def _database_error() -> Exception:
    from sqlalchemy.exc import OperationalError

    return OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))


def test_a_database_outage_while_publishing_leaves_no_unreferenced_upload(
        ctx: WorkerContext, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    quick = WorkerContext(settings=ctx.settings.model_copy(update={"publish_retry_seconds": 0.5}),
                          storage=storage, sessions=ctx.sessions, worker_id="w")
    job = new_job(quick, storage)
    down: list[bool] = []
    real = {name: getattr(lease, name) for name in ("finish", "update_progress", "heartbeat")}

    def failing(name: str) -> Callable[..., bool]:
        def call(*args: object, **kwargs: object) -> bool:
            if name == "finish":
                down.append(True)  # the database goes away as the gallery is being published...
            if down:
                raise _database_error()  # ...and stays away
            return bool(real[name](*args, **kwargs))
        return call

    for name in real:
        monkeypatch.setattr(lease, name, failing(name))
    with pytest.raises(Exception, match="server closed the connection"):
        run_training_job(job.id, ctx=quick, engine=FakeEngine(steps=6, checkpoint_every=2, preview_every=0))
    for name, function in real.items():
        monkeypatch.setattr(lease, name, function)
    running, subject, images, photos = load(quick, job)
    assert running.status == "running" and images == [] and subject is not None and subject.weights_key is None
    # Nothing uploaded for the gallery stays without a row; the recorded checkpoint stays for the next attempt.
    assert [key for key in subject_files(storage, job) if "/weights/" in key or "/images/" in key] == []
    assert storage.list(running.details["checkpoint"]["prefix"])
    assert len(photos) == 4 and not (quick.settings.scratch_dir / str(job.id)).exists()


def test_a_commit_error_after_the_gallery_was_committed_keeps_the_gallery(
        ctx: WorkerContext, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.orm import sessionmaker

    lose_the_answer: list[bool] = []

    class AnswerLost(Session):
        def commit(self) -> None:
            super().commit()
            if lose_the_answer:
                lose_the_answer.clear()
                raise _database_error()  # committed, but the worker never hears so

    flaky = WorkerContext(settings=ctx.settings, storage=storage, worker_id="w",
                          sessions=sessionmaker(bind=ctx.sessions.kw["bind"], class_=AnswerLost,
                                                expire_on_commit=False))
    job = new_job(flaky, storage)
    real_finish = lease.finish

    def finish(session: Session, job_id: uuid.UUID, token: str, status: str, **values: object) -> bool:
        if status == "done":
            lose_the_answer.append(True)
        return real_finish(session, job_id, token, status, **values)  # type: ignore[arg-type]

    monkeypatch.setattr(lease, "finish", finish)
    assert run_training_job(job.id, ctx=flaky, engine=FakeEngine()) == "done"
    done, subject, images, _ = load(flaky, job)
    assert done.status == "done" and len(images) == 2 and all(storage.exists(image.storage_key) for image in images)
    assert subject is not None and subject.weights_key and storage.list(subject.weights_key)


def test_a_full_media_storage_is_named_as_the_studios_storage_not_the_workers_disk(
        ctx: WorkerContext, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.storage import local

    job = new_job(ctx, storage)

    def no_room(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.shutil, "copyfileobj", no_room)  # every upload of the worker finds the media disk full
    assert run_training_job(job.id, ctx=ctx, engine=FakeEngine(steps=6, checkpoint_every=2)) == "failed"
    failed, _, _, photos = load(ctx, job)
    assert (failed.failure_reason or "").startswith("The studio's storage is full")
    assert "worker" not in (failed.failure_reason or "") and "Try again" in (failed.failure_reason or "")
    assert len(photos) == 4  # kept for "Try again"


def test_the_model_the_owner_chose_is_the_one_trained_and_its_family_is_recorded(
        ctx: WorkerContext, storage: LocalStorage) -> None:
    # The worker's own STUDIO_BASE_MODEL serves only studios without a choice.
    ctx = replace(ctx, settings=ctx.settings.model_copy(update={"base_model": "tiny"}))
    choice = {"key": "xl", "name": "Tiny SDXL", "spec": "tiny-sdxl", "licence": "MIT", "licence_url": None}
    job = new_job(ctx, storage, base_model_choice=choice)
    engine = FakeEngine()
    assert run_training_job(job.id, ctx=ctx, engine=engine) == "done"
    assert engine.calls[0] == "load:tiny-sdxl"
    done, subject, _, _ = load(ctx, job)
    assert done.details["base_model"] == "tiny-sdxl" and done.details["base_model_key"] == "xl"
    assert (done.details["family"], done.details["family_label"]) == ("sdxl", "Stable Diffusion XL")
    assert subject is not None and subject.base_model == "tiny-sdxl"
    assert subject.model_info["family"] == "sdxl" and subject.model_info["family_label"] == "Stable Diffusion XL"
    assert subject.base_model_choice == choice  # the choice stays as it was made


@pytest.mark.parametrize("choice", [None, {"key": "default", "name": "The studio's standard model", "spec": None,
                                           "licence": None, "licence_url": None}])
def test_without_a_chosen_spec_the_worker_trains_its_configured_model(
        ctx: WorkerContext, storage: LocalStorage, choice: dict[str, object] | None) -> None:
    ctx = replace(ctx, settings=ctx.settings.model_copy(update={"base_model": "tiny"}))
    job = new_job(ctx, storage, base_model_choice=choice)
    engine = FakeEngine()
    assert run_training_job(job.id, ctx=ctx, engine=engine) == "done"
    assert engine.calls[0] == "load:tiny"
    done, subject, _, _ = load(ctx, job)
    assert done.details["family_label"] == "Stable Diffusion 1.x/2.x"
    assert subject is not None and subject.model_info["family"] == "sd"
