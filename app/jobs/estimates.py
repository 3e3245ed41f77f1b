"""Time estimates: how long a studio takes, before it starts, while it waits in line and while it runs.

A job's **plan** is the seconds each step of the stepper is expected to take (preparing, class
priors, training, generating), computed once when the job is created and kept in
``details["plan"]``, so the bar and the time left move steadily instead of jumping with every
stage. It multiplies what the recipe will do (class-prior pictures still missing from the shared
bank, training steps, gallery pictures) by the **speeds measured on this studio's workers**: the
worker records each stage's seconds (``details["stage_seconds"]``, worker/tasks/runtime.py), and
the medians of the last finished studios on the same base model give seconds per class picture, per
training step, per gallery picture, and the fixed cost of preparing and publishing. Before any
studio has finished on a model, the demo model uses speeds measured on a 2-core CPU (bench/train.py,
docs/benchmarks.md); another model has no estimate until its first studio finished.

While a job runs, the time left of its current step blends the plan with the engine's own measured
rate, trusting the measurement more as the step advances; the later steps count at their plan.
While it waits in line, the jobs ahead of it (what the running ones have left, and the plans of the
queued ones before it) are shared among the workers that are busy.

Pure rules and queries, no torch: the recipe's numbers come from :mod:`worker.engine.presets`.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Job, Subject
from worker.engine.presets import DEMO_PRIOR_IMAGES, preset
from worker.engine.prompts import DEFAULT_PACK, STYLE_PACKS, SubjectKind, subject_kind

PLAN_STEPS = ("preparing", "priors", "training", "generating")
RECENT_JOBS = 50  # finished training jobs looked at for speeds
SPEED_SAMPLES = 10  # of those, the newest this many that measured a speed count
DEMO_SPECS = frozenset({"tiny", "tiny-sdxl", "tiny-flux2", "tiny-zimage"})


@dataclass(frozen=True)
class Speeds:
    """Seconds per unit of work on this studio's workers, for one base model."""

    prior_image: float  # one class-prior picture painted
    train_step: float  # one optimizer step
    gallery_image: float  # one gallery picture sampled and scored
    preparing: float  # photos, model and bank loaded
    publishing: float  # weights and pictures uploaded, rows written
    measured_jobs: int  # how many finished studios these come from (0: the built-in fallback)
    family: str = "sd"


# The demo model with the worker's thread count (1) on the 2-core CPU box shared with other work (load
# average 5-7): a first "balanced" studio through a real worker, 40 class pictures in 5.2 s, 500 steps in
# 20.9 s, 40 gallery pictures in 4.7 s (`python bench/job.py --preset --quality balanced --broker filesystem`,
# docs/benchmarks.md, "The demo model's first studio").
DEMO_SPEEDS = Speeds(prior_image=0.13, train_step=0.042, gallery_image=0.12, preparing=1.0, publishing=1.0,
                     measured_jobs=0)


@dataclass(frozen=True)
class Work:
    """What a training job will do: class-prior pictures to paint, steps, gallery pictures."""

    prior_images: int
    steps: int
    gallery_images: int


def this_host_has_no_gpu() -> bool:
    """No NVIDIA driver on this machine: a worker beside this web process (``studio up``) trains the demo model."""
    return shutil.which("nvidia-smi") is None and not Path("/proc/driver/nvidia").exists()


def studio_spec(subject: Subject, settings: Settings) -> str:
    """The base model spec a studio trains on, as far as the web knows ("" for "the worker's default")."""
    chosen = (subject.base_model_choice or {}).get("spec")
    return str(chosen).strip() if chosen else settings.base_model


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _job_speeds(job: Job) -> dict[str, float]:
    """The speeds one finished training job measured (only those it has the numbers for)."""
    details = job.details or {}
    stages = details.get("stage_seconds")
    if not isinstance(stages, dict):
        return {}
    seconds = {key: value for key, raw in stages.items() if (value := _number(raw)) is not None}
    found: dict[str, float] = {}
    generated = _number(details.get("prior_generated")) or 0
    if generated >= 5 and "priors" in seconds:
        found["prior_image"] = seconds["priors"] / generated
    steps = _number(details.get("train_steps")) or 0
    if steps > 0 and "training" in seconds:
        found["train_step"] = seconds["training"] / steps
    images = _number(details.get("images_total")) or 0
    if images > 0 and "sampling" in seconds:
        found["gallery_image"] = (seconds["sampling"] + seconds.get("scoring", 0.0)) / images
    if "preparing" in seconds:
        found["preparing"] = seconds["preparing"]
    if job.started_at is not None and job.finished_at is not None:
        total = (job.finished_at - job.started_at).total_seconds()
        found["publishing"] = max(0.0, total - sum(seconds.values()))
    return found


def recent_training_jobs(session: Session) -> list[tuple[Job, str]]:
    """The newest finished training jobs with their subject's class noun, newest first."""
    rows = session.execute(
        select(Job, Subject.class_noun)
        .join(Subject, Subject.id == Job.subject_id)
        .where(Job.kind == "train", Job.status == "done")
        .order_by(Job.finished_at.desc())
        .limit(RECENT_JOBS)
    ).all()
    return [(row[0], row[1]) for row in rows]


def _same_model(job: Job, spec: str) -> bool:
    details = job.details or {}
    if spec:
        return details.get("base_model") == spec
    return details.get("base_model_key") in (None, "default")  # trained on the worker's default model


def measured_speeds(recent: Sequence[tuple[Job, str]], spec: str) -> Speeds | None:
    """The median speeds of the newest finished studios on ``spec``; the demo's fallback; else None."""
    jobs = [job for job, _ in recent if _same_model(job, spec)]
    samples: dict[str, list[float]] = {}
    for job in jobs:
        for name, value in _job_speeds(job).items():
            if len(samples.setdefault(name, [])) < SPEED_SAMPLES:
                samples[name].append(value)
    demo = spec in DEMO_SPECS or (not spec and any((job.details or {}).get("demo_model") for job in jobs[:1])) \
        or (not spec and not jobs and this_host_has_no_gpu())
    fallback = DEMO_SPEEDS if demo else None
    needed = ("prior_image", "train_step", "gallery_image", "preparing", "publishing")
    if fallback is None and any(name not in samples for name in needed if name != "prior_image"):
        return None
    values: dict[str, float] = {}
    for name in needed:
        if name in samples:
            values[name] = median(samples[name])
        elif fallback is not None:
            values[name] = getattr(fallback, name)
        else:  # no job painted class priors yet (a bank-free recipe, or a warm bank): a training step's cost
            values[name] = median(samples["train_step"]) * 4
    family = next((str(job.details["family"]) for job in jobs if (job.details or {}).get("family")), "sd")
    return Speeds(**values, measured_jobs=len(jobs), family=family)


def bank_is_warm(recent: Iterable[tuple[Job, str]], spec: str, class_noun: str, count: int) -> bool:
    """Whether a finished studio on the same model and class already left ``count`` class pictures in the bank."""
    noun = " ".join(class_noun.split()).lower()
    for job, other_noun in recent:
        details = job.details or {}
        if _same_model(job, spec) and " ".join(other_noun.split()).lower() == noun:
            had = (_number(details.get("prior_generated")) or 0) + (_number(details.get("prior_reused")) or 0)
            if had >= count:
                return True
    return False


def worker_overrides(settings: Settings) -> tuple[dict[str, Any], int | None]:
    """The operator's training overrides and class-prior count (the workers read the same settings)."""
    from worker.settings import worker_settings_from  # torch-free

    worker = worker_settings_from(settings)
    return dict(worker.train_overrides), worker.prior_images


def training_work(settings: Settings, speeds: Speeds | None, kind: str, quality: str, demo: bool,
                  gallery_images: int) -> Work:
    """The recipe's work for a studio of ``kind`` (pet or person) at ``quality``."""
    overrides, prior_images = worker_overrides(settings)
    values = {**preset(speeds.family if speeds else "sd", (kind, quality)), **overrides}  # type: ignore[arg-type]
    steps = int(values.get("steps", 0))
    if prior_images is not None:
        priors = prior_images
    elif values.get("with_prior", True) and values.get("prior_source", "bank") == "bank":
        priors = int(values.get("num_class_images", 0))
        priors = min(priors, DEMO_PRIOR_IMAGES) if demo else priors
    else:
        priors = 0
    return Work(prior_images=priors, steps=steps, gallery_images=gallery_images)


def plan_seconds(work: Work, speeds: Speeds) -> dict[str, float]:
    """Expected seconds per stepper step of a training job."""
    return {
        "preparing": round(speeds.preparing, 1),
        "priors": round(work.prior_images * speeds.prior_image, 1),
        "training": round(work.steps * speeds.train_step, 1),
        "generating": round(work.gallery_images * speeds.gallery_image + speeds.publishing, 1),
    }


def gallery_size(style_pack: str | None, prompts: Sequence[str], images_per_prompt: int, kind: SubjectKind) -> int:
    """How many gallery pictures a studio samples: its pack's prompts (the kind's default pack when it gave
    no prompts of its own) and its own, each ``images_per_prompt`` times."""
    default = DEFAULT_PACK["person" if kind == "person" else "pet"]
    pack = STYLE_PACKS.get(style_pack or "") or (STYLE_PACKS.get(default) if not prompts else None)
    return ((len(pack.prompts) if pack else 0) + len(prompts)) * images_per_prompt


def plan_training(session: Session, settings: Settings, subject: Subject) -> dict[str, Any] | None:
    """The plan of a new training job of ``subject``; None when no speed is known for its model."""
    recent = recent_training_jobs(session)
    spec = studio_spec(subject, settings)
    speeds = measured_speeds(recent, spec)
    if speeds is None:
        return None
    kind = subject_kind(subject.kind)
    demo = speeds is not None and (spec in DEMO_SPECS or (speeds.measured_jobs == 0 and speeds == DEMO_SPEEDS)
                                   or _default_is_demo(recent, spec))
    work = training_work(settings, speeds, kind, subject.quality, demo,
                         gallery_size(subject.style_pack, list(subject.prompts or []), subject.images_per_prompt, kind))
    if work.prior_images and bank_is_warm(recent, spec, subject.class_noun, work.prior_images):
        work = Work(0, work.steps, work.gallery_images)
    return {**plan_seconds(work, speeds), "measured_jobs": speeds.measured_jobs}


def _default_is_demo(recent: Sequence[tuple[Job, str]], spec: str) -> bool:
    latest = next((job for job, _ in recent if _same_model(job, spec)), None)
    return latest is not None and bool((latest.details or {}).get("demo_model"))


def plan_generation(session: Session, settings: Settings, subject: Subject, images: int) -> dict[str, Any] | None:
    """The plan of a "generate more" job of ``images`` pictures: all in its one generating step."""
    speeds = measured_speeds(recent_training_jobs(session), studio_spec(subject, settings))
    if speeds is None:
        return None
    return {"generating": round(speeds.preparing + images * speeds.gallery_image + speeds.publishing, 1),
            "measured_jobs": speeds.measured_jobs}


def plan_of(job: Job) -> dict[str, float] | None:
    """The job's plan, steps in stepper order with their expected seconds; None for a job without one."""
    raw = (job.details or {}).get("plan")
    if not isinstance(raw, Mapping):
        return None
    plan = {key: max(0.0, value) for key in PLAN_STEPS if (value := _number(raw.get(key))) is not None}
    return plan if plan and sum(plan.values()) > 0 else None


def total_seconds(plan: Mapping[str, float] | None) -> float | None:
    return None if plan is None else float(sum(plan.values()))


def studio_estimates(session: Session, settings: Settings, offers: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """What the new-studio page needs to say how long a studio will take, for each offered model.

    ``offers`` are (key, spec) pairs (spec "" for the worker's default). For each model the answer holds,
    per kind and quality, the seconds of everything but the gallery, and the seconds per gallery picture
    (the page multiplies by the pictures the form asks for); a model without a known speed is left out.
    """
    recent = recent_training_jobs(session)
    models: dict[str, Any] = {}
    for key, spec in offers:
        speeds = measured_speeds(recent, spec)
        if speeds is None:
            continue
        demo = spec in DEMO_SPECS or speeds == DEMO_SPEEDS or _default_is_demo(recent, spec)
        fixed: dict[str, dict[str, float]] = {}
        priors: dict[str, dict[str, float]] = {}
        for kind in ("pet", "person"):
            for quality in ("fast", "balanced", "best"):
                work = training_work(settings, speeds, kind, quality, demo, gallery_images=0)
                plan = plan_seconds(work, speeds)
                fixed.setdefault(kind, {})[quality] = round(sum(plan.values()), 1)
                priors.setdefault(kind, {})[quality] = plan["priors"]
        # Classes whose pictures the bank already holds: a studio of one of them paints none.
        warm = sorted({" ".join(noun.split()).lower() for job, noun in recent if _same_model(job, spec)
                       and (_number((job.details or {}).get("prior_generated")) or 0)
                       + (_number((job.details or {}).get("prior_reused")) or 0) > 0})
        models[key] = {"fixed": fixed, "priors": priors, "per_image": round(speeds.gallery_image, 3),
                       "warm_classes": warm, "measured_jobs": speeds.measured_jobs}
    return models
