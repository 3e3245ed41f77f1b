"""Warming the class-prior bank before the first customer: ``studio priors fill`` and the console's button.

A fill paints the class images a training job of that base model and class would use, with exactly
the job's bank key (the model's resolution, the operator's ``STUDIO_PRIOR_STEPS`` or the family's
sampler steps and guidance, the default negative prompt), so the first job of that class reuses them
instead of painting them. It pulls what storage already holds, paints only what is missing, and
pushes the bank back (worker.tasks.prior_bank). The console sends it as the task ``priors.fill`` to
the gpu queue; the command runs it in its own process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from app.config import Settings
from app.operator.service import check_prior_fill
from app.subjects import base_models
from worker.celery_app import celery_app
from worker.engine.progress import ProgressCallback
from worker.tasks.engine_adapter import ModelLike, chosen_base_model
from worker.tasks.prior_bank import pull_banks, push_banks
from worker.tasks.runtime import WorkerContext, default_context

log = logging.getLogger(__name__)

class PriorFiller(Protocol):
    def load_model(self, spec: str) -> ModelLike: ...

    def fill_priors(self, model: ModelLike, bank_root: Path, class_noun: str, count: int, *, steps: int | None,
                    resolution: int | None, progress: ProgressCallback | None = None) -> tuple[int, int]: ...


class DiffusersPriorFiller:
    """The real filler: worker/engine's model loader and prior bank, imported when used."""

    def load_model(self, spec: str) -> ModelLike:
        from worker.engine.models import load_base_model

        model: ModelLike = load_base_model(spec)
        return model

    def fill_priors(self, model: ModelLike, bank_root: Path, class_noun: str, count: int, *, steps: int | None,
                    resolution: int | None, progress: ProgressCallback | None = None) -> tuple[int, int]:
        from worker.engine.job import class_prompt_for
        from worker.engine.priors import fill_prior_bank

        loaded: Any = model
        family = loaded.family
        result = fill_prior_bank(loaded, bank_root, class_prompt_for(class_noun), count,
                                 resolution=resolution or loaded.resolution, steps=steps or family.sample_steps,
                                 guidance=family.sample_guidance, progress=progress)
        return result.generated, result.reused


@dataclass(frozen=True)
class FillResult:
    spec: str
    class_noun: str
    generated: int
    reused: int


def model_spec(settings: Settings, model: str) -> str:
    """What ``--model`` names: an offered model's key (STUDIO_BASE_MODELS; empty: the default), else a spec."""
    offer = base_models.choose(settings, model)
    if offer is not None:
        return chosen_base_model(offer.record(), settings.base_model)
    return chosen_base_model({"spec": model}, settings.base_model)


def fill_priors(ctx: WorkerContext, filler: PriorFiller, model: str, class_noun: str, count: int,
                progress: ProgressCallback | None = None) -> FillResult:
    """Fill the bank of ``model`` and ``class_noun`` up to ``count`` images, shared through storage."""
    noun = check_prior_fill(class_noun, count)
    spec = model_spec(ctx.settings, model)
    loaded = filler.load_model(spec)
    bank_root = ctx.settings.resolved_prior_cache_dir
    with ctx.transaction() as session:
        pull_banks(session, ctx.storage, bank_root, loaded.fingerprint)
    generated, reused = filler.fill_priors(
        loaded, bank_root, noun, count, steps=ctx.settings.prior_steps,
        resolution=ctx.settings.train_overrides.get("resolution"), progress=progress)
    with ctx.transaction() as session:
        push_banks(session, ctx.storage, bank_root, loaded.fingerprint)
    log.info("prior bank of %r for %s: %d painted, %d already there", noun, spec, generated, reused)
    return FillResult(spec, noun, generated, reused)


@celery_app.task(name="priors.fill")
def fill_priors_task(model: str, class_noun: str, count: int) -> dict[str, object]:
    """The console's "fill": runs on a GPU worker."""
    result = fill_priors(default_context(), DiffusersPriorFiller(), model, class_noun, int(count))
    return {"spec": result.spec, "generated": result.generated, "reused": result.reused}
