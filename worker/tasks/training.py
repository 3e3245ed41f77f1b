"""Task "training.run"(job_id): fine-tune a subject's model, sample its gallery and publish it.

The steps of one attempt (see worker/tasks/runtime.py for the lease machinery):

1. claim the job (a duplicate or stale delivery exits here);
2. fetch the photos into the job's scratch folder, and the latest checkpoint of an earlier attempt
   into the work folder (so a job resumed on another worker continues from it);
3. load the base model the owner chose (``Subject.base_model_choice``, one of STUDIO_BASE_MODELS);
   without a choice ``settings.base_model``, and without that the tiny demo model on a machine
   without CUDA; record its family; pull the shared class-prior bank of that model from storage;
4. run the engine with throttled, fenced progress: stage, step/total, loss, ETA, previews and
   checkpoints uploaded to storage as they appear;
5. push new prior-bank images, upload weights and images to a per-attempt place, and publish in ONE
   transaction fenced by the lease: GeneratedImage rows, the subject's identifier/base model/weights,
   the job done, and (when configured) the photo rows removed;
6. after the commit, remove checkpoints and the photo files.

Whatever happens the scratch folder is removed; a cancelled, failed or superseded attempt removes
the files it uploaded and did not publish.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Task
from PIL import Image
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.jobs import lease
from app.models import GeneratedImage, Job, Photo, Subject, utcnow
from app.storage import ObjectNotFound
from app.storage.base import checkpoint_prefix, image_key, preview_key, subject_prefix, weights_prefix
from worker.celery_app import celery_app
from worker.engine.progress import Progress
from worker.engine.prompts import STYLE_PACKS, expand, split_shape, subject_kind
from worker.engine.spec import JobSpec
from worker.scratch import scratch_folder
from worker.tasks.engine_adapter import (
    DiffusersEngine,
    Engine,
    JobResultLike,
    ModelLike,
    SampleLike,
    ScoresLike,
    chosen_base_model,
    family_facts,
    lighter_training,
    run_within_memory,
)
from worker.tasks.outcomes import JobFailure, settle
from worker.tasks.prior_bank import pull_banks, push_banks
from worker.tasks.runtime import (
    PREVIEWS_KEPT,
    LeasedAttempt,
    PublishUncertain,
    StopRun,
    WorkerContext,
    claim_job,
    default_context,
    give_back_on_outage,
    is_redelivery,
)

log = logging.getLogger(__name__)

# Folders of a run that are not part of the published weights.
NOT_WEIGHTS = frozenset({"checkpoints", "checkpoint", "samples", "previews", "images", "logs"})
PHOTOS_GONE_REASON = (
    "The uploaded photos are no longer available (they are removed after training and when a studio expires). "
    "Please create the studio again with new photos."
)


@celery_app.task(name="training.run", bind=True)
def training_run(self: Task, job_id: str) -> str:
    """Run one attempt of a training job; returns the outcome (done, failed, cancelled, skipped, lost, deleted)."""
    return give_back_on_outage(lambda: run_training_job(uuid.UUID(job_id), redelivered=is_redelivery(self)))


@dataclass
class _Loaded:
    job: Job
    subject: Subject
    photos: list[Photo]


def run_training_job(job_id: uuid.UUID, *, ctx: WorkerContext | None = None, engine: Engine | None = None,
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
        if job is None or subject is None:
            return "deleted"
        photos = list(session.execute(
            select(Photo).where(Photo.subject_id == subject.id).order_by(Photo.position)
        ).scalars())
        loaded = _Loaded(job, subject, photos)
    attempt = LeasedAttempt(ctx, loaded.job, token)
    with attempt, scratch_folder(ctx.settings.scratch_dir, job_id, loaded.subject.id) as scratch:
        attempt.scratch = scratch

        def run() -> str:
            if loaded.job.kind != "train":
                raise JobFailure(f"This job is a {loaded.job.kind!r} job, not a training job.")
            return _TrainingRun(ctx, engine, attempt, loaded, scratch).run()

        return settle(attempt, run, ctx.settings.task_hard_time_limit)


class _TrainingRun:
    def __init__(self, ctx: WorkerContext, engine: Engine, attempt: LeasedAttempt, loaded: _Loaded,
                 scratch: Path) -> None:
        self.ctx = ctx
        self.engine = engine
        self.attempt = attempt
        self.job = loaded.job
        self.subject = loaded.subject
        self.photos = loaded.photos
        self.scratch = scratch
        self.work_dir = scratch / "work"
        self.checkpoint_keys: list[str] = []

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> str:
        attempt = self.attempt
        attempt.write(stage="preparing", step=0, total=len(self.photos), force=True)
        photo_paths = self._fetch_photos()
        self._restore_checkpoint()
        choice = self.subject.base_model_choice or {}
        spec = chosen_base_model(choice, self.ctx.settings.base_model)
        model = self._load_model(spec)
        attempt.details.update({"base_model": spec, "base_model_key": choice.get("key"),
                                "demo_model": bool(model.is_demo), **family_facts(model)})
        bank_root = self.ctx.settings.resolved_prior_cache_dir
        with self.ctx.transaction() as session:
            pulled = pull_banks(session, self.ctx.storage, bank_root, model.fingerprint)
        log.info("job %s: prior bank synced from storage (%d banks, %d files)", self.job.id, pulled.banks, pulled.files)
        attempt.raise_if_stopped()

        settings = self.ctx.settings
        job_spec = JobSpec(
            photos=photo_paths,
            class_noun=self.subject.class_noun,
            subject_kind=subject_kind(self.subject.kind),
            work_dir=self.work_dir,
            bank_root=bank_root,
            quality=self.subject.quality,
            train_overrides=dict(settings.train_overrides),
            prior_images=settings.prior_images,
            pack=self.subject.style_pack or None,
            prompts=list(self.subject.prompts or []),
            images_per_prompt=self.subject.images_per_prompt,
            seed=_seed_of(self.job.id),
        )
        # The operator's step counts when set; otherwise the engine's defaults.
        if settings.sample_steps is not None:
            job_spec.sample_steps = settings.sample_steps
        if settings.prior_steps is not None:
            job_spec.prior_steps = settings.prior_steps
        result = run_within_memory(
            lambda run_spec: self.engine.train(run_spec, model, self._on_progress, attempt.should_cancel),
            job_spec, lighter_training, self.engine, self._on_lighter,
        )

        with self.ctx.transaction() as session:
            pushed = push_banks(session, self.ctx.storage, bank_root, model.fingerprint)
        log.info("job %s: prior bank pushed to storage (%d new files)", self.job.id, pushed.files)
        attempt.details.update({"prior_generated": int(result.prior_generated),
                                "prior_reused": int(result.prior_reused)})
        attempt.details.update(_train_facts(result.train))
        attempt.raise_if_stopped()
        attempt.write(stage="publishing", step=0, total=len(result.images), force=True)
        return self._publish(result, spec, model)

    def _fetch_photos(self) -> list[Path]:
        if not self.photos or self.subject.photos_deleted_at is not None:
            raise JobFailure(PHOTOS_GONE_REASON)
        folder = self.scratch / "photos"
        paths = []
        for photo in self.photos:
            target = folder / f"{photo.position:02d}.jpg"
            try:
                self.ctx.storage.download_to(photo.storage_key, target)
            except ObjectNotFound:
                raise JobFailure(PHOTOS_GONE_REASON) from None
            paths.append(target)
        return paths

    def _restore_checkpoint(self) -> None:
        """Download the checkpoint an earlier attempt recorded, at the same place under the work folder."""
        recorded = self.attempt.details.get("checkpoint")
        if not isinstance(recorded, dict) or not recorded.get("prefix") or not recorded.get("path"):
            return
        target = self.work_dir / str(recorded["path"])
        keys = self.ctx.storage.list(str(recorded["prefix"]))
        if not keys:
            log.warning("job %s: recorded checkpoint is missing from storage; starting over", self.job.id)
            return
        for key in keys:
            self.ctx.storage.download_to(key, target / key[len(str(recorded["prefix"])):])
        self.checkpoint_keys = keys
        self.attempt.details["resumed_from"] = int(recorded.get("step", 0))
        log.info("job %s: resuming from the checkpoint at step %s", self.job.id, recorded.get("step"))

    def _load_model(self, spec: str) -> ModelLike:
        try:
            return self.engine.load_model(spec)
        except Exception as exc:
            log.exception("job %s: base model %r failed to load", self.job.id, spec)
            raise JobFailure(f"The base model {spec!r} could not be loaded; ask the studio's operator to check it.") \
                from exc

    def _on_lighter(self, changes: list[str]) -> None:
        log.warning("job %s: the GPU ran out of memory; trying again with %s", self.job.id, ", ".join(changes))
        self.attempt.details["memory_fallback"] = changes

    # -- progress ------------------------------------------------------------------------------

    def _on_progress(self, event: Progress) -> None:
        attempt = self.attempt
        values: dict[str, Any] = {"stage": event.stage, "step": event.step, "total": event.total,
                                  "eta_seconds": event.eta_seconds}
        force = False
        if event.loss is not None and math.isfinite(event.loss):
            values["loss"] = float(event.loss)
            if event.stage == "training":
                attempt.record_loss(event.loss)
        if event.stage == "priors" and event.reused is not None:
            attempt.details["prior_reused"] = int(event.reused)
        if event.stage == "sampling":
            attempt.details.update({"images_done": event.step, "images_total": event.total})
        if event.previews:
            self._add_previews(event)
            force = True
        if event.checkpoint is not None:
            self._save_checkpoint(event.checkpoint, event.step)
            force = True
        attempt.write(force=force, **values)

    def _add_previews(self, event: Progress) -> None:
        attempt = self.attempt
        for index, path in enumerate(event.previews):
            name = f"a{attempt.attempt}-{event.stage}-{event.step:06d}-{index}.png"
            key = attempt.upload(preview_key(self.job.owner_id, self.job.subject_id, self.job.id, name), path,
                                 "image/png")
            attempt.preview_keys.append(key)
            attempt.referenced.add(key)
        evicted = attempt.preview_keys[:-PREVIEWS_KEPT]
        attempt.preview_keys = attempt.preview_keys[-PREVIEWS_KEPT:]
        # Removed before the write that forgets them: a page may show a missing preview for a second, never leak one.
        for key in evicted:
            self.ctx.storage.delete(key)

    def _save_checkpoint(self, folder: Path, step: int) -> None:
        attempt = self.attempt
        prefix = (checkpoint_prefix(self.job.owner_id, self.job.subject_id, self.job.id)
                  + f"a{attempt.attempt}-step{step:06d}/")
        keys = attempt.upload_folder(prefix, folder)
        try:
            relative = folder.resolve().relative_to(self.work_dir.resolve()).as_posix()
        except ValueError:
            relative = folder.name
        # The old checkpoint goes only once a write has recorded this one (LeasedAttempt.flush): if the
        # write fails, the database still points at the old one and the next attempt resumes there.
        attempt.supersede([key for key in self.checkpoint_keys if key not in keys])
        self.checkpoint_keys = keys
        attempt.details["checkpoint"] = {"prefix": prefix, "path": relative, "step": int(step)}
        attempt.referenced.update(keys)

    # -- publishing ----------------------------------------------------------------------------

    def _publish(self, result: JobResultLike, spec: str, model: ModelLike) -> str:
        attempt = self.attempt
        job, subject = self.job, self.subject
        weights_at = f"{weights_prefix(job.owner_id, job.subject_id)}{job.id}-{attempt.attempt}/"
        weight_keys = self._upload_weights(result.run_dir, weights_at)
        images = self._upload_images(result)
        attempt.details.update({"images_done": len(images), "images_total": len(images), "identifier":
                                result.identifier})
        now = utcnow()
        attempt.stop_heartbeat()
        photo_keys = [photo.storage_key for photo in self.photos] if self.ctx.settings.delete_photos_after_training \
            else []
        # Everything is uploaded: the local copies of the photos go before the job turns done.
        attempt.drop_scratch()
        details = {key: value for key, value in attempt.details.items() if key != "checkpoint"}

        def write(session: Session) -> bool:
            # The checkpoint stays recorded until this commits: if it fails, the next attempt resumes there.
            won = lease.finish(session, job.id, attempt.token, "done", stage="finished", step=len(images),
                               total=len(images), details=details, preview_keys=list(attempt.preview_keys))
            if not won:
                return False
            session.add_all(images)
            fresh_subject = session.get(Subject, subject.id)
            if fresh_subject is None:
                raise StopRun("deleted")
            fresh_subject.identifier = result.identifier
            fresh_subject.base_model = spec
            fresh_subject.weights_key = weights_at
            fresh_subject.model_info = {
                "base_model": spec,
                "fingerprint": model.fingerprint,
                "demo_model": bool(model.is_demo),
                **family_facts(model),
                "class_prompt": result.class_prompt,
                "instance_prompt": getattr(result, "instance_prompt", None),
                "weights_files": [key[len(weights_at):] for key in weight_keys],
                "job_id": str(job.id),
            }
            if photo_keys:
                session.execute(delete(Photo).where(Photo.subject_id == subject.id))
                fresh_subject.photos_deleted_at = now
            return True

        published_keys = weight_keys + [image.storage_key for image in images]
        try:
            won = attempt.commit_final(write, "done")
        except PublishUncertain:
            # A committed gallery may point at these: not this attempt's to remove (the reconciler's, if unused).
            attempt.forget_uploads(published_keys)
            raise
        if not won:
            raise StopRun(attempt.why_lost())
        attempt.details = details
        attempt.forget_uploads(published_keys)
        log.info("job %s published %d images", job.id, len(images))
        self.ctx.storage.delete_prefix(checkpoint_prefix(job.owner_id, job.subject_id, job.id))
        for key in photo_keys:
            self.ctx.storage.delete(key)
        if photo_keys:
            self.ctx.storage.delete_prefix(f"{subject_prefix(job.owner_id, job.subject_id)}photos/")
        return "done"

    def _upload_weights(self, run_dir: Path, prefix: str) -> list[str]:
        keys = []
        for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(run_dir)
            if relative.parts[0] in NOT_WEIGHTS or any(part.startswith(".") for part in relative.parts):
                continue
            keys.append(self.attempt.upload(prefix + relative.as_posix(), path))
        if not keys:
            raise JobFailure("Training finished without producing weights; the error was logged. Please try again.")
        return keys

    def _upload_images(self, result: JobResultLike) -> list[GeneratedImage]:
        templates = _templates_of(self.subject)
        engine_ranking = list(getattr(result, "ranking", None) or [])  # image indices, best first
        ranks: list[int | None]
        if sorted(engine_ranking) == list(range(len(result.images))) and engine_ranking:
            ranks = [None] * len(result.images)
            for position, index in enumerate(engine_ranking, start=1):
                ranks[index] = position
        else:
            ranks = rank_images(result.scores, len(result.images))
        # A person's job: each picture's face match (None: no face); absent for pets and fakes.
        distances = list(getattr(result, "face_distances", None) or [])
        images = []
        for index, record in enumerate(result.images):
            scores = result.scores[index] if index < len(result.scores) else None
            image = self._store_image(record, scores, ranks[index], templates, result.identifier)
            if len(distances) == len(result.images):
                image.face_checked = True
                image.face_distance = distances[index]
            images.append(image)
            self.attempt.details["images_done"] = index + 1
        return images

    def _store_image(self, record: SampleLike, scores: ScoresLike | None, rank: int | None,
                     templates: list[str], identifier: str) -> GeneratedImage:
        job = self.job
        image_id = uuid.uuid4()
        key = self.attempt.upload(image_key(job.owner_id, job.subject_id, image_id), record.path, "image/png")
        with Image.open(record.path) as picture:
            width, height = picture.size
        return GeneratedImage(
            id=image_id,
            subject_id=job.subject_id,
            job_id=job.id,
            storage_key=key,
            prompt=record.prompt[:500],
            prompt_template=template_for(record, templates, identifier, self.subject.class_noun)[:500],
            seed=int(record.seed),
            steps=int(record.steps),
            guidance=float(record.guidance),
            width=width,
            height=height,
            dino=_score(scores, "dino"),
            clip_i=_score(scores, "clip_i"),
            clip_t=_score(scores, "clip_t"),
            rank=rank,
        )


def _seed_of(job_id: uuid.UUID) -> int:
    """A per-job seed: the same job gives the same pictures on every attempt."""
    return job_id.int % (2**31)


def _train_facts(train: Any) -> dict[str, Any]:
    """The facts of the engine's TrainResult worth showing on the page (those it has)."""
    facts: dict[str, Any] = {}
    if hasattr(train, "resumed_from"):  # the engine's word wins over the checkpoint the worker restored
        facts["resumed_from"] = train.resumed_from
    for name, detail in (("final_step", "train_steps"),
                         ("seconds", "train_seconds"), ("steps_per_second", "train_steps_per_second")):
        value = getattr(train, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            facts[detail] = value
    return facts


def _score(scores: ScoresLike | None, name: str) -> float | None:
    value = getattr(scores, name, None) if scores is not None else None
    return None if value is None else float(value)


def rank_images(scores: Sequence[ScoresLike | None], count: int) -> list[int | None]:
    """Rank 1 = the best likeness: by DINO, then CLIP-I, then CLIP-T; all None when nothing was scored."""
    aligned = [scores[index] if index < len(scores) else None for index in range(count)]
    if all(_score(found, "dino") is None and _score(found, "clip_i") is None for found in aligned):
        return [None] * count

    def order_key(index: int) -> tuple[float, float, float]:
        values = [_score(aligned[index], name) for name in ("dino", "clip_i", "clip_t")]
        dino, clip_i, clip_t = (-value if value is not None else float("inf") for value in values)
        return dino, clip_i, clip_t

    ranks: list[int | None] = [None] * count
    for position, index in enumerate(sorted(range(count), key=order_key), start=1):
        ranks[index] = position
    return ranks


def _templates_of(subject: Subject) -> list[str]:
    templates = list(subject.prompts or [])
    pack = STYLE_PACKS.get(subject.style_pack) if subject.style_pack else None
    if pack is not None:
        templates.extend(pack.prompts)
    return templates


def template_for(record: SampleLike, templates: list[str], identifier: str, class_noun: str) -> str:
    """The ``{subject}`` template a sample's prompt came from (the prompt itself when none matches)."""
    explicit = getattr(record, "template", None) or getattr(record, "prompt_template", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    for template in templates:
        # The sample's prompt is what was painted: without the template's shape marker, if it has one.
        if split_shape(expand(template, identifier, class_noun))[0] == record.prompt:
            return template
    return record.prompt
