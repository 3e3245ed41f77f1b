"""What the tasks need from the DreamBooth engine, and the adapter onto worker/engine.

The tasks talk to an :class:`Engine`; the real one (:class:`DiffusersEngine`) imports torch and
worker.engine lazily, inside its methods, so importing a task module stays torch-free. Tests inject
a fake engine with the same shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from worker.engine.progress import CancelCheck, ProgressCallback
from worker.engine.spec import JobSpec


class FamilyLike(Protocol):
    """A base-model family as the tasks record it: ``name`` ("sd", "sdxl") and ``label`` ("Stable Diffusion XL")."""

    @property
    def name(self) -> str: ...
    @property
    def label(self) -> str: ...


class ModelLike(Protocol):
    """Read-only views: the engine's dataclasses satisfy them, and so do test fakes."""

    @property
    def spec(self) -> str: ...
    @property
    def family(self) -> FamilyLike: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def is_demo(self) -> bool: ...


class SampleLike(Protocol):
    @property
    def path(self) -> Path: ...
    @property
    def prompt(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def guidance(self) -> float: ...


class ScoresLike(Protocol):
    @property
    def dino(self) -> float | None: ...
    @property
    def clip_i(self) -> float | None: ...
    @property
    def clip_t(self) -> float | None: ...


class JobResultLike(Protocol):
    @property
    def identifier(self) -> str: ...
    @property
    def class_prompt(self) -> str: ...
    @property
    def run_dir(self) -> Path: ...
    @property
    def images(self) -> Sequence[SampleLike]: ...
    @property
    def scores(self) -> Sequence[ScoresLike]: ...
    @property
    def prior_generated(self) -> int: ...
    @property
    def prior_reused(self) -> int: ...
    @property
    def train(self) -> Any: ...


@dataclass
class GenerationInputs:
    """A "generate more" run on trained weights."""

    run_dir: Path
    prompts: list[str]
    identifier: str
    class_noun: str
    images_per_prompt: int
    out_dir: Path
    seed: int = 0
    sample_steps: int | None = None
    batch_size: int | None = None  # images per sampling call; None: the engine's


class Engine(Protocol):
    def load_model(self, spec: str) -> ModelLike: ...

    def train(self, spec: JobSpec, model: ModelLike, progress: ProgressCallback,
              should_cancel: CancelCheck) -> JobResultLike: ...

    def generate(self, inputs: GenerationInputs, model: ModelLike, progress: ProgressCallback,
                 should_cancel: CancelCheck) -> Sequence[SampleLike]: ...

    def free_memory(self) -> None:
        """Give back the memory a failed run left cached (the GPU allocator's cache)."""


def family_facts(model: ModelLike) -> dict[str, str]:
    """The loaded model's family for the job's details and the subject's model_info (pages read them)."""
    return {"family": str(model.family.name), "family_label": str(model.family.label)}


def chosen_base_model(choice: dict[str, Any] | None, configured: str) -> str:
    """The spec to train a studio on: the one its owner chose (recorded with the studio at creation),
    else the worker's configured model (:func:`default_base_model`) — for the single, unlisted model
    and for studios made before there was a choice."""
    spec = (choice or {}).get("spec")
    if isinstance(spec, str) and spec.strip():
        return spec.strip()
    return default_base_model(configured)


def default_base_model(configured: str) -> str:
    """The configured base model, or the tiny demo model without CUDA, or SD 1.5 with it."""
    if configured:
        return configured
    import torch

    from worker.settings import DEFAULT_GPU_BASE_MODEL

    return DEFAULT_GPU_BASE_MODEL if torch.cuda.is_available() else "tiny"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA (or CPU allocator) out-of-memory error, without importing torch needlessly."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError | MemoryError) and "out of memory" in str(exc).lower()


Inputs = TypeVar("Inputs")
Result = TypeVar("Result")


def lighter_training(spec: JobSpec) -> tuple[JobSpec, list[str]] | None:
    """The same run with settings that need less GPU memory, and the changes in words; None when
    there is nothing left to lighten.

    Both changes cost speed, not quality: gradient checkpointing recomputes activations in the
    backward pass instead of keeping them (same gradients, so the run may resume from a checkpoint
    of the heavier one), and sampling one image per call instead of a batch.
    """
    overrides = dict(spec.train_overrides)
    changes = []
    if not overrides.get("gradient_checkpointing"):
        overrides["gradient_checkpointing"] = True
        changes.append("gradient checkpointing")
    if spec.batch_size != 1:
        changes.append("one image per sampling call")
    if not changes:
        return None
    return replace(spec, train_overrides=overrides, batch_size=1), changes


def lighter_generation(inputs: GenerationInputs) -> tuple[GenerationInputs, list[str]] | None:
    """One image per sampling call instead of a batch; None when it already is."""
    if inputs.batch_size == 1:
        return None
    return replace(inputs, batch_size=1), ["one image per sampling call"]


def run_within_memory(
    run: Callable[[Inputs], Result],
    inputs: Inputs,
    lighter: Callable[[Inputs], tuple[Inputs, list[str]] | None],
    engine: Engine,
    on_lighter: Callable[[list[str]], None],
) -> Result:
    """``run(inputs)``; when the GPU runs out of memory, once more with ``lighter(inputs)``.

    A card that is a little too small for the recipe (an 8–12 GB one) then finishes the job more
    slowly instead of failing it. Other errors, and running out again, propagate.
    """
    try:
        return run(inputs)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        lightened = lighter(inputs)
        if lightened is None:
            raise
    # Out of the handler first: its traceback kept the failed run's tensors alive.
    engine.free_memory()
    lighter_inputs, changes = lightened
    on_lighter(changes)
    return run(lighter_inputs)


class DiffusersEngine:
    """The real engine: worker/engine's run_job and generate_more on the device it selects."""

    def load_model(self, spec: str) -> ModelLike:
        from worker.engine.models import load_base_model

        model: ModelLike = load_base_model(spec)
        return model

    def train(self, spec: JobSpec, model: ModelLike, progress: ProgressCallback,
              should_cancel: CancelCheck) -> JobResultLike:
        from worker.engine.job import run_job

        return run_job(spec, model, progress=progress, should_cancel=should_cancel)  # type: ignore[arg-type]

    def generate(self, inputs: GenerationInputs, model: ModelLike, progress: ProgressCallback,
                 should_cancel: CancelCheck) -> Sequence[SampleLike]:
        from worker.engine.job import generate_more

        extra: dict[str, Any] = {}
        if inputs.sample_steps is not None:
            extra["steps"] = inputs.sample_steps
        if inputs.batch_size is not None:
            extra["batch_size"] = inputs.batch_size
        records: Sequence[SampleLike] = generate_more(
            model,  # type: ignore[arg-type]
            inputs.run_dir,
            inputs.prompts,
            identifier=inputs.identifier,
            class_noun=inputs.class_noun,
            images_per_prompt=inputs.images_per_prompt,
            out_dir=inputs.out_dir,
            seed=inputs.seed,
            progress=progress,
            should_cancel=should_cancel,
            **extra,
        )
        return records

    def free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
