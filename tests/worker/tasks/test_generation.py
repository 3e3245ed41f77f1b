"""The "generate more" task: new images from the published weights, no retraining."""

from __future__ import annotations

from sqlalchemy import select

from app.models import GeneratedImage, GenerationRequest, Job, Subject
from app.storage import LocalStorage
from tests.worker.factories import make_job, make_subject, make_user
from tests.worker.fakes import FakeEngine
from worker.tasks.engine_adapter import GenerationInputs
from worker.tasks.generation import run_generation_job
from worker.tasks.runtime import WorkerContext
from worker.tasks.training import run_training_job


def trained_subject_job(ctx: WorkerContext, storage: LocalStorage) -> Job:
    with ctx.transaction() as session:
        subject = make_subject(session, storage, make_user(session))
        job = make_job(session, subject)
    assert run_training_job(job.id, ctx=ctx, engine=FakeEngine()) == "done"
    return job


def generate_job(ctx: WorkerContext, train_job: Job, prompts: list[str]) -> Job:
    with ctx.transaction() as session:
        job = Job(subject_id=train_job.subject_id, owner_id=train_job.owner_id, kind="generate")
        session.add(job)
        session.flush()
        session.add(GenerationRequest(subject_id=job.subject_id, job_id=job.id, prompts=prompts, images_per_prompt=2))
    return job


def test_generate_more_adds_images_from_the_trained_weights(ctx: WorkerContext, storage: LocalStorage) -> None:
    train_job = trained_subject_job(ctx, storage)
    job = generate_job(ctx, train_job, ["a photo of {subject} as an astronaut"])
    engine = FakeEngine()
    assert run_generation_job(job.id, ctx=ctx, engine=engine) == "done"
    assert engine.calls == ["load:tiny", "generate"]
    with ctx.transaction() as session:
        done = session.get(Job, job.id)
        images = list(session.execute(select(GeneratedImage).where(GeneratedImage.job_id == job.id)).scalars())
    assert done is not None and done.status == "done" and done.details["images_done"] == 2
    assert len(images) == 2 and all(storage.exists(image.storage_key) for image in images)
    assert images[0].prompt == "a photo of qzx dog as an astronaut"
    assert images[0].prompt_template == "a photo of {subject} as an astronaut"
    assert not any(image.face_checked for image in images)  # a dog's pictures: no face looked for


def test_a_person_studios_new_pictures_get_their_face_checked(ctx: WorkerContext, storage: LocalStorage) -> None:
    with ctx.transaction() as session:
        subject = make_subject(session, storage, make_user(session), kind="person", class_noun="woman")
        train_job = make_job(session, subject)
    assert run_training_job(train_job.id, ctx=ctx, engine=FakeEngine()) == "done"
    job = generate_job(ctx, train_job, ["a photo of {subject} as an astronaut"])
    assert run_generation_job(job.id, ctx=ctx, engine=FakeEngine()) == "done"
    with ctx.transaction() as session:
        images = list(session.execute(select(GeneratedImage).where(GeneratedImage.job_id == job.id)).scalars())
    # Against the faces the run recorded; the fake's flat pictures show none.
    assert [(image.face_checked, image.face_distance) for image in images] == [(True, None), (True, None)]


def test_generate_more_scores_real_faces_against_the_persons_uploads(ctx: WorkerContext, storage: LocalStorage) -> None:
    """The real face model on "generate more": the person again matches strongly, someone else does
    not match, a picture without a face has no score."""
    from tests import face_photos
    from worker.engine.faces import MATCH_THRESHOLD, STRONG_MATCH, face_model

    uploads = [face_model().analyse(image).descriptor for image in face_photos.variations(face_photos.hopper())[:3]]
    engine = FakeEngine(face_references=[[float(value) for value in face] for face in uploads if face is not None],
                        more_pictures=[face_photos.hopper(), face_photos.collins()])
    with ctx.transaction() as session:
        subject = make_subject(session, storage, make_user(session), kind="person", class_noun="woman")
        train_job = make_job(session, subject)
    assert run_training_job(train_job.id, ctx=ctx, engine=engine) == "done"
    job = generate_job(ctx, train_job, ["a photo of {subject} on a boat", "a photo of {subject} in a garden"])
    assert run_generation_job(job.id, ctx=ctx, engine=engine) == "done"
    with ctx.transaction() as session:
        images = sorted(session.execute(select(GeneratedImage).where(GeneratedImage.job_id == job.id)).scalars(),
                        key=lambda image: image.seed)
    assert len(engine.face_references or []) == 3 and len(images) == 4
    same, other, *flat = [image.face_distance for image in images]
    assert same is not None and same < STRONG_MATCH
    assert other is not None and other > MATCH_THRESHOLD
    assert flat == [None, None] and all(image.face_checked for image in images)


def test_generate_more_on_an_untrained_subject_fails_clearly(ctx: WorkerContext, storage: LocalStorage) -> None:
    with ctx.transaction() as session:
        subject = make_subject(session, storage, make_user(session))
        train_job = make_job(session, subject)
    job = generate_job(ctx, train_job, ["a photo of {subject}"])
    assert run_generation_job(job.id, ctx=ctx, engine=FakeEngine()) == "failed"
    with ctx.transaction() as session:
        failed = session.get(Job, job.id)
    assert failed is not None and "no trained model yet" in (failed.failure_reason or "")


def test_generate_more_out_of_gpu_memory_goes_on_one_image_at_a_time(ctx: WorkerContext,
                                                                     storage: LocalStorage) -> None:
    train_job = trained_subject_job(ctx, storage)
    job = generate_job(ctx, train_job, ["a photo of {subject} as an astronaut"])
    engine = FakeEngine(fail_with=RuntimeError("CUDA out of memory."), fail_times=1)
    assert run_generation_job(job.id, ctx=ctx, engine=engine) == "done"
    first, second = engine.inputs_seen
    assert isinstance(first, GenerationInputs) and isinstance(second, GenerationInputs)
    assert first.batch_size is None and second.batch_size == 1
    with ctx.transaction() as session:
        done = session.get(Job, job.id)
    assert done is not None and done.details["memory_fallback"] == ["one image per sampling call"]
    assert done.details["images_done"] == 2


def test_generate_more_keeps_the_model_the_studio_was_trained_on(ctx: WorkerContext, storage: LocalStorage) -> None:
    with ctx.transaction() as session:
        subject = make_subject(session, storage, make_user(session), base_model_choice={
            "key": "xl", "name": "Tiny SDXL", "spec": "tiny-sdxl", "licence": "MIT", "licence_url": None})
        train_job = make_job(session, subject)
    assert run_training_job(train_job.id, ctx=ctx, engine=FakeEngine()) == "done"
    # The operator's offer changes afterwards; the studio's weights still belong to tiny-sdxl.
    with ctx.transaction() as session:
        fresh = session.get(Subject, subject.id)
        assert fresh is not None
        fresh.base_model_choice = {**fresh.base_model_choice, "spec": "something-else"}  # type: ignore[dict-item]
    job = generate_job(ctx, train_job, ["a photo of {subject} as an astronaut"])
    engine = FakeEngine()
    assert run_generation_job(job.id, ctx=ctx, engine=engine) == "done"
    assert engine.calls == ["load:tiny-sdxl", "generate"]
    with ctx.transaction() as session:
        done = session.get(Job, job.id)
    assert done is not None and done.details["family_label"] == "Stable Diffusion XL"
