"""One DreamBooth job from photos to a gallery: the orchestration both the CLI and the Celery task use.

Stages, each reported through ``progress`` with its own ``stage`` name:

1. ``preparing``: check, crop and resize the photos into ``work_dir/prepared/``;
2. ``priors``: make sure the shared class-prior bank holds the class images (generate only the missing);
3. ``training``: fine-tune into ``work_dir/run/`` (weights, checkpoints, previews, ``run.json``);
4. ``sampling``: the prompt pack and free prompts into ``work_dir/samples/``;
5. ``scoring``: DINO / CLIP-I / CLIP-T of each sample against the photos, and a ranking; for a
   person, the face match of each sample against the uploads' faces (``worker.engine.likeness``)
   ranks first, pictures without a face last, and is written to ``run.json`` too.

Calling :func:`run_job` again on the same ``work_dir`` after a crash continues: the bank already
holds its images, training resumes from the run's last complete checkpoint (or returns at once
when the run had finished), and sampling starts the gallery again from scratch (it is
deterministic, so the result is the same gallery).

Prompts: the instance prompt is "a photo of {identifier} {class_noun}", the class prompt "a photo
of a {class_noun}".
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worker.engine.errors import EngineInputError
from worker.engine.evaluate import Scorer, Scores, default_scorer, rank, strip_identifier
from worker.engine.identifiers import choose_identifier, validate_identifier
from worker.engine.likeness import face_distances, face_ranking, faces_info, record_likeness, reference_descriptors
from worker.engine.models import BaseModel, device_memory_gb
from worker.engine.photos import PhotoProblem, prepare_photos
from worker.engine.presets import DEMO_PRIOR_IMAGES
from worker.engine.priors import fill_prior_bank
from worker.engine.progress import CancelCheck, Progress, ProgressCallback, check_cancel
from worker.engine.recipes import recipe
from worker.engine.sample import (
    INDEX_FILE,
    SampleRecord,
    expand_prompts,
    pack_templates,
    sample_images,
)
from worker.engine.spec import DEFAULT_SAMPLE_NEGATIVE, JobSpec
from worker.engine.train import TrainConfig, TrainResult, train
from worker.engine.weights import load_trained_pipeline, read_run_file

logger = logging.getLogger(__name__)

PREPARED_DIR = "prepared"
RUN_DIR = "run"
SAMPLES_DIR = "samples"
SCORES_FILE = "scores.json"
PREVIEW_PROMPT_COUNT = 2  # the first prompts of the pack are sampled as training previews
PREVIEWS_PER_RUN = 4  # preview rounds over a training run, when the caller does not set preview_every
QUALITIES = ("fast", "balanced", "best")


def instance_prompt_for(identifier: str, class_noun: str) -> str:
    return f"a photo of {identifier} {class_noun}"


def class_prompt_for(class_noun: str) -> str:
    return f"a photo of a {class_noun}"


@dataclass
class JobResult:
    """Everything a job made. ``scores`` is aligned with ``images`` (empty when not scored);
    ``ranking`` lists indices into ``images`` from the best combined score to the worst."""

    identifier: str
    class_prompt: str
    instance_prompt: str
    run_dir: Path
    images: list[SampleRecord]
    scores: list[Scores]
    prior_generated: int
    prior_reused: int
    photo_problems: list[PhotoProblem]
    train: TrainResult
    ranking: list[int] = field(default_factory=list)
    faces_found: int = 0
    # A person's job: each image's mean face distance to the uploads (None: no face), aligned with
    # ``images``; empty when not measured (a pet, or scoring off).
    face_distances: list[float | None] = field(default_factory=list)


def _check_spec(spec: JobSpec) -> None:
    if not spec.class_noun.strip():
        raise EngineInputError("class noun is empty; give the kind of subject, e.g. 'dog' or 'person'")
    if spec.subject_kind not in ("pet", "person"):
        raise EngineInputError(f"unknown subject kind {spec.subject_kind!r}; choose pet or person")
    if spec.quality not in QUALITIES:
        raise EngineInputError(f"unknown quality {spec.quality!r}; choose one of {', '.join(QUALITIES)}")
    for name in ("images_per_prompt", "sample_steps", "prior_steps", "batch_size"):
        value = getattr(spec, name)
        if value is None and name in ("sample_steps", "prior_steps"):
            continue
        if not isinstance(value, int) or value <= 0:
            raise EngineInputError(f"{name.replace('_', ' ')} must be a positive integer (got {value!r})")
    if spec.prior_images is not None and spec.prior_images < 0:
        raise EngineInputError(f"prior images must be 0 or more (got {spec.prior_images})")
    if spec.resolution is not None and (spec.resolution <= 0 or spec.resolution % 8):
        raise EngineInputError(f"resolution {spec.resolution} must be a positive multiple of 8")


def training_config(spec: JobSpec, model: BaseModel, preview_prompts: list[str]) -> TrainConfig:
    """The recipe for the spec's subject and quality with its overrides, resolution and seed applied."""
    overrides = dict(spec.train_overrides)
    if spec.resolution is not None:
        overrides["resolution"] = spec.resolution
    overrides.setdefault("resolution", model.resolution)
    overrides["seed"] = spec.seed
    overrides.setdefault("preview_prompts", preview_prompts)
    config = recipe(spec.subject_kind, spec.quality, model.family.name, **overrides)  # type: ignore[arg-type]
    # Live previews on the studio page: a few over the run, unless the caller decided.
    if "preview_every" not in spec.train_overrides and config.preview_prompts:
        config.preview_every = max(1, config.steps // PREVIEWS_PER_RUN)
    # On a card too small for the family's full-speed step, trade speed for memory from the start
    # (rather than only after running out of memory), unless the caller decided.
    memory = device_memory_gb(model.device)
    if "gradient_checkpointing" not in spec.train_overrides and memory is not None:
        config.gradient_checkpointing = memory < model.family.full_speed_memory_gb
    if "quantize_base" not in spec.train_overrides and memory is not None and config.method == "lora":
        config.quantize_base = "int8" if memory < model.family.int8_base_memory_gb else "none"
    config.validate()
    return config


def recipe_prior_images(config: TrainConfig, model: BaseModel) -> int:
    """The class-prior images a job takes when the caller does not say: the recipe's, at most
    :data:`DEMO_PRIOR_IMAGES` on a demo model."""
    return min(config.num_class_images, DEMO_PRIOR_IMAGES) if model.is_demo else config.num_class_images


def job_prompts(spec: JobSpec, identifier: str, class_noun: str) -> list[str]:
    """The prompts a job samples: the named pack (or, with no free prompts, the kind's default pack),
    then the free prompts, all expanded with "[V] [class noun]"."""
    templates = list(pack_templates(spec.pack, spec.subject_kind)) if spec.pack or not spec.prompts else []
    return expand_prompts([*templates, *spec.prompts], identifier, class_noun)


def _or_default(value: float | None, default: float) -> float:
    return default if value is None else value


def _emit(progress: ProgressCallback | None, event: Progress) -> None:
    if progress is not None:
        progress(event)


def run_job(spec: JobSpec, model: BaseModel, progress: ProgressCallback | None = None,
            should_cancel: CancelCheck | None = None, scorer: Scorer | None = None) -> JobResult:
    """Prepare, fill the prior bank, train, sample and score; see the module docstring for the layout.

    ``scorer`` scores the samples when ``spec.score`` is set; without one, the built-in demo
    models get small random encoders (the numbers then only exercise the path) and real models go
    unscored, since loading DINO and CLIP per job would cost more than it tells: the caller keeps
    one :class:`Scorer` loaded and passes it in.

    Raises :class:`EngineInputError` for unusable input, ``Cancelled`` when ``should_cancel`` says
    so, and the training and bank errors of the stages.
    """
    _check_spec(spec)
    work_dir = Path(spec.work_dir)
    class_noun = " ".join(spec.class_noun.split())
    tokenizers = model.family.identifier_tokenizers(model)
    identifier = (validate_identifier(tokenizers, spec.identifier, class_noun) if spec.identifier
                  else choose_identifier(tokenizers, class_noun, seed=spec.seed))
    prompts = job_prompts(spec, identifier, class_noun)
    instance_prompt = instance_prompt_for(identifier, class_noun)
    class_prompt = class_prompt_for(class_noun)
    config = training_config(spec, model, prompts[:PREVIEW_PROMPT_COUNT])

    # 1. preparing
    check_cancel(should_cancel)
    _emit(progress, Progress(stage="preparing", step=0, total=len(spec.photos), message="checking the photos"))
    prepared = prepare_photos(list(spec.photos), work_dir / PREPARED_DIR, config.resolution, spec.subject_kind)
    _emit(progress, Progress(stage="preparing", step=len(spec.photos), total=len(spec.photos),
                             message=f"{len(prepared.images)} photos ready, {len(prepared.problems)} left out"))

    # 2. priors
    check_cancel(should_cancel)
    prior_count = spec.prior_images if spec.prior_images is not None else recipe_prior_images(config, model)
    if not config.with_prior or config.prior_source == "base_model":
        prior_count = 0  # no prior term, or its targets come from the base model: no class images
    if prior_count > 0:
        default_steps, default_guidance = model.family.sample_defaults(model)
        bank = fill_prior_bank(model, spec.bank_root, class_prompt, prior_count, resolution=config.resolution,
                               steps=spec.prior_steps or default_steps,
                               guidance=_or_default(spec.prior_guidance, default_guidance),
                               negative_prompt=spec.prior_negative_prompt, batch_size=spec.batch_size,
                               progress=progress, should_cancel=should_cancel)
        class_images, prior_generated, prior_reused, bank_key = bank.images, bank.generated, bank.reused, bank.key
    else:
        if config.prior_source == "bank":
            config.with_prior = False  # no class images asked for: train without the prior term
        class_images, prior_generated, prior_reused, bank_key = [], 0, 0, None
        message = ("the base model keeps the class: no class-prior images needed"
                   if config.with_prior else "no class-prior images")
        _emit(progress, Progress(stage="priors", step=0, total=0, reused=0, message=message))

    # The uploads' faces, kept with the run so later samples are scored against them too.
    references = (reference_descriptors([p for p in spec.photos if p.name not in {q.name for q in prepared.problems}])
                  if spec.subject_kind == "person" and spec.score else [])

    # 3. training
    check_cancel(should_cancel)
    run_dir = work_dir / RUN_DIR
    run_info = {
        "identifier": identifier,
        "class_noun": class_noun,
        "subject_kind": spec.subject_kind,
        "instance_prompt": instance_prompt,
        "class_prompt": class_prompt,
        "prompts": prompts,
        "base_model": {"spec": model.spec, "fingerprint": model.fingerprint, "family": model.family.name},
        "quality": spec.quality,
        "prior": {"key": bank_key, "count": prior_count, "generated": prior_generated, "reused": prior_reused},
        "photos": {"used": len(prepared.images), "problems": [str(p) for p in prepared.problems],
                   "faces_found": prepared.faces_found},
    }
    if references:
        run_info["faces"] = faces_info(references)
    trained = train(model, config, instance_images=prepared.images, instance_prompt=instance_prompt,
                    class_images=class_images, class_prompt=class_prompt, run_dir=run_dir, progress=progress,
                    should_cancel=should_cancel, run_info=run_info)

    # 4. sampling
    check_cancel(should_cancel)
    samples_dir = work_dir / SAMPLES_DIR
    _clear_gallery(samples_dir)
    records = generate_more(model, run_dir, prompts, identifier=identifier, class_noun=class_noun,
                            images_per_prompt=spec.images_per_prompt, out_dir=samples_dir, seed=spec.seed,
                            steps=spec.sample_steps, guidance=spec.guidance,
                            negative_prompt=spec.sample_negative_prompt, batch_size=spec.batch_size,
                            resolution=config.resolution, progress=progress, should_cancel=should_cancel)

    # 5. scoring
    scores: list[Scores] = []
    if spec.score:
        # The demo model's pictures are noise: real encoders would only spend time on them.
        scorer = scorer or (Scorer.random(seed=0) if model.is_demo else default_scorer())
    if spec.score and scorer is not None:
        scores = scorer.score([r.path for r in records], prepared.images,
                              [strip_identifier(r.prompt, identifier) for r in records],
                              progress=progress, should_cancel=should_cancel)
    ranking = rank(scores) if scores else []
    distances: list[float | None] = []
    if references:
        check_cancel(should_cancel)
        distances = face_distances([r.path for r in records], references)
        ranking = face_ranking(distances, ranking)
        record_likeness(run_dir, [r.path.name for r in records], distances)
    if scores or distances:
        _write_scores(samples_dir, records, scores, ranking, distances)
    return JobResult(identifier=identifier, class_prompt=class_prompt, instance_prompt=instance_prompt,
                     run_dir=run_dir, images=records, scores=scores, prior_generated=prior_generated,
                     prior_reused=prior_reused, photo_problems=prepared.problems, train=trained, ranking=ranking,
                     faces_found=prepared.faces_found, face_distances=distances)


def _clear_gallery(samples_dir: Path) -> None:
    """Remove a previous attempt's samples, so a re-run's gallery is not doubled."""
    if not samples_dir.is_dir():
        return
    for stale in [*samples_dir.glob("sample-*.png"), samples_dir / INDEX_FILE, samples_dir / SCORES_FILE]:
        stale.unlink(missing_ok=True)


def _write_scores(samples_dir: Path, records: list[SampleRecord], scores: list[Scores], ranking: list[int],
                  distances: list[float | None]) -> None:
    position = {index: place for place, index in enumerate(ranking)}
    images: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        entry: dict[str, Any] = {"file": record.path.name, "rank": position[index]}
        if scores:
            entry.update(asdict(scores[index]), combined=scores[index].combined)
        if distances:
            entry["face_distance"] = distances[index]
        images.append(entry)
    payload = {"images": images}
    temporary = samples_dir / f".{SCORES_FILE}.tmp"
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, samples_dir / SCORES_FILE)


def run_details(run_dir: Path) -> dict[str, Any]:
    """What a finished job's run folder says about itself: identifier, class noun, base model spec, resolution.

    Raises :class:`EngineInputError` when ``run_dir`` is not a finished run made by :func:`run_job`.
    """
    record = read_run_file(run_dir)
    info = record.get("run_info") or {}
    base = record.get("base_model") or info.get("base_model") or {}
    details = {
        "identifier": info.get("identifier"),
        "class_noun": info.get("class_noun"),
        "subject_kind": info.get("subject_kind", "pet"),
        "base_model": base.get("spec"),
        "fingerprint": base.get("fingerprint"),
        "resolution": (record.get("config") or {}).get("resolution"),
    }
    missing = [name for name in ("identifier", "class_noun", "base_model") if not details[name]]
    if missing:
        raise EngineInputError(f"{run_dir}/run.json does not record the {', '.join(missing)} of the job")
    return details


def generate_more(model: BaseModel, run_dir: Path, prompts: list[str], *, identifier: str, class_noun: str,
                  images_per_prompt: int, out_dir: Path, seed: int, steps: int | None = None,
                  guidance: float | None = None,
                  negative_prompt: str = DEFAULT_SAMPLE_NEGATIVE, batch_size: int = 4,
                  resolution: int | None = None, progress: ProgressCallback | None = None,
                  should_cancel: CancelCheck | None = None) -> list[SampleRecord]:
    """Sample more images from a trained run: ``prompts`` are templates (``{subject}``) or free prompts.

    Images are added to ``out_dir`` after those already there. ``resolution`` defaults to the
    run's training resolution, ``steps`` and ``guidance`` to the model family's. Raises
    :class:`EngineInputError` when the run holds no trained weights or was trained on another base
    model spec (a different fingerprint of the same spec is logged as a warning).
    """
    record = read_run_file(run_dir)
    trained_on = record.get("base_model") or {}
    if trained_on.get("spec") and trained_on["spec"] != model.spec:
        raise EngineInputError(
            f"{run_dir} was trained on base model {trained_on['spec']!r}, not on the loaded {model.spec!r}"
        )
    if trained_on.get("fingerprint") and trained_on["fingerprint"] != model.fingerprint:
        # Same spec, other fingerprint: the checkpoint behind the spec changed, or (today)
        # models.fingerprint is not stable across processes (it hashes a diffusers config list
        # whose order follows string hashing). Warn rather than refuse until that is fixed.
        logger.warning("%s was trained on %s fingerprint %s; the loaded model's is %s", run_dir, model.spec,
                       trained_on["fingerprint"], model.fingerprint)
    if resolution is None:
        resolution = int((record.get("config") or {}).get("resolution") or model.resolution)
    # Prompts already expanded by run_job pass through unchanged: they hold no {subject}
    # and already name the subject.
    subject = f"{identifier} {class_noun}"
    expanded = [p if subject in p else expand_prompts([p], identifier, class_noun)[0] for p in prompts]
    pipe = load_trained_pipeline(model, run_dir)
    default_steps, default_guidance = model.family.sample_defaults(model)
    return sample_images(pipe, expanded, images_per_prompt=images_per_prompt, out_dir=out_dir, seed=seed,
                         steps=steps or default_steps,
                         guidance=_or_default(guidance, default_guidance),
                         negative_prompt=negative_prompt, batch_size=batch_size,
                         resolution=resolution, base_model=model.spec, progress=progress,
                         should_cancel=should_cancel, autocast_dtype=model.dtype)
