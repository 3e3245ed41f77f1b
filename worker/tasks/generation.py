"""Task "generation.run"(job_id): "generate more" pictures of a trained subject, without retraining.

Claims the job, downloads the subject's published weights into scratch, samples the
GenerationRequest's prompts with the engine, uploads the images and publishes their rows with the
job's ``done`` in one transaction fenced by the lease. Cancel, failure and lease loss are handled
as for training (worker/tasks/outcomes.py).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path

from celery import Task
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import lease
from app.models import GeneratedImage, GenerationRequest, Job, Subject
from app.storage.base import image_key
from worker.celery_app import celery_app
from worker.engine.progress import Progress
from worker.scratch import scratch_folder
from worker.tasks.engine_adapter import (
    DiffusersEngine,
    Engine,
    GenerationInputs,
    SampleLike,
    family_facts,
    lighter_generation,
    run_within_memory,
)
from worker.tasks.outcomes import JobFailure, settle
from worker.tasks.runtime import (
    LeasedAttempt,
    PublishUncertain,
    StopRun,
    WorkerContext,
    claim_job,
    default_context,
    give_back_on_outage,
    is_redelivery,
)
from worker.tasks.training import template_for

log = logging.getLogger(__name__)

NOT_TRAINED_REASON = "This studio has no trained model yet (or it expired), so no new pictures can be made."


@celery_app.task(name="generation.run", bind=True)
def generation_run(self: Task, job_id: str) -> str:
    """Run one attempt of a "generate more" job; returns the outcome."""
    return give_back_on_outage(lambda: run_generation_job(uuid.UUID(job_id), redelivered=is_redelivery(self)))


def run_generation_job(job_id: uuid.UUID, *, ctx: WorkerContext | None = None, engine: Engine | None = None,
                       redelivered: bool = False) -> str:
    """Claim and run ``job_id``; the engine and context are injectable for tests."""
    ctx = ctx or default_context()
    engine = engine or DiffusersEngine()
    token = claim_job(ctx, job_id, redelivered=redelivered)
    if token is None:
        return "skipped"
    with ctx.transaction() as session:
        job = session.get(Job, job_id)
        subject = session.get(Subject, job.subject_id) if job is not None else None
        request = session.execute(
            select(GenerationRequest).where(GenerationRequest.job_id == job_id)
        ).scalar_one_or_none()
        if job is None or subject is None:
            return "deleted"
    attempt = LeasedAttempt(ctx, job, token)
    with attempt, scratch_folder(ctx.settings.scratch_dir, job_id, subject.id) as scratch:
        attempt.scratch = scratch

        def run() -> str:
            if job.kind != "generate" or request is None:
                raise JobFailure("This job has no 'generate more' request to run.")
            return _generate(ctx, engine, attempt, job, subject, request, scratch)

        return settle(attempt, run, ctx.settings.task_hard_time_limit)


def _generate(ctx: WorkerContext, engine: Engine, attempt: LeasedAttempt, job: Job, subject: Subject,
              request: GenerationRequest, scratch: Path) -> str:
    if not subject.weights_key or not subject.identifier or not subject.base_model:
        raise JobFailure(NOT_TRAINED_REASON)
    total = len(request.prompts) * request.images_per_prompt
    attempt.write(stage="preparing", step=0, total=total, force=True)
    run_dir = scratch / "run"
    keys = ctx.storage.list(subject.weights_key)
    if not keys:
        raise JobFailure(NOT_TRAINED_REASON)
    for key in keys:
        ctx.storage.download_to(key, run_dir / key[len(subject.weights_key):])
    # The model the studio was trained on, whatever the operator offers now.
    model = engine.load_model(subject.base_model)
    attempt.details.update({"base_model": subject.base_model, "demo_model": bool(model.is_demo),
                            **family_facts(model), "images_done": 0, "images_total": total})
    attempt.raise_if_stopped()

    def on_progress(event: Progress) -> None:
        if event.stage == "sampling":
            attempt.details.update({"images_done": event.step, "images_total": event.total})
        attempt.write(stage=event.stage, step=event.step, total=event.total, eta_seconds=event.eta_seconds)

    inputs = GenerationInputs(
        run_dir=run_dir,
        prompts=list(request.prompts),
        identifier=subject.identifier,
        class_noun=subject.class_noun,
        images_per_prompt=request.images_per_prompt,
        out_dir=scratch / "images",
        seed=job.id.int % (2**31),
        sample_steps=ctx.settings.sample_steps,
    )

    def on_lighter(changes: list[str]) -> None:
        log.warning("generation job %s: the GPU ran out of memory; trying again with %s", job.id, ", ".join(changes))
        attempt.details["memory_fallback"] = changes

    records = run_within_memory(
        lambda run_inputs: engine.generate(run_inputs, model, on_progress, attempt.should_cancel),
        inputs, lighter_generation, engine, on_lighter,
    )
    attempt.raise_if_stopped()
    attempt.write(stage="publishing", step=0, total=len(records), force=True)
    images = [_store(attempt, job, subject, record, request.prompts) for record in records]
    _score_faces(run_dir, records, images)
    attempt.details.update({"images_done": len(images), "images_total": len(images)})
    attempt.stop_heartbeat()
    attempt.drop_scratch()  # before the job turns done: whoever sees it done finds no local copy left

    def write(session: Session) -> bool:
        won = lease.finish(session, job.id, attempt.token, "done", stage="finished", step=len(images),
                           total=len(images), details=dict(attempt.details), preview_keys=list(attempt.preview_keys))
        if won:
            session.add_all(images)
        return won

    image_keys = [image.storage_key for image in images]
    try:
        won = attempt.commit_final(write, "done")
    except PublishUncertain:
        attempt.forget_uploads(image_keys)  # a committed row may point at them (the reconciler's, if not)
        raise
    if not won:
        raise StopRun(attempt.why_lost())
    attempt.forget_uploads(image_keys)
    log.info("generation job %s published %d images", job.id, len(images))
    return "done"


def _score_faces(run_dir: Path, records: Sequence[SampleLike], images: list[GeneratedImage]) -> None:
    """A person's new pictures get their face match against the uploads' faces the run recorded."""
    from worker.engine.likeness import RUN_FILE, face_distances, references_of

    try:
        run_info = json.loads((run_dir / RUN_FILE).read_text()).get("run_info") or {}
    except (OSError, ValueError):
        return
    references = references_of(run_info)
    if not references:
        return
    for image, distance in zip(images, face_distances([record.path for record in records], references), strict=True):
        image.face_checked = True
        image.face_distance = distance


def _store(attempt: LeasedAttempt, job: Job, subject: Subject, record: SampleLike,
           templates: list[str]) -> GeneratedImage:
    image_id = uuid.uuid4()
    key = attempt.upload(image_key(job.owner_id, job.subject_id, image_id), record.path, "image/png")
    with Image.open(record.path) as picture:
        width, height = picture.size
    return GeneratedImage(
        id=image_id,
        subject_id=job.subject_id,
        job_id=job.id,
        storage_key=key,
        prompt=record.prompt[:500],
        prompt_template=template_for(record, templates, subject.identifier or "", subject.class_noun)[:500],
        seed=int(record.seed),
        steps=int(record.steps),
        guidance=float(record.guidance),
        width=width,
        height=height,
    )
