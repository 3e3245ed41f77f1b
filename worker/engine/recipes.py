"""Training presets: base-model family × subject kind (pet, person) × quality (fast, balanced, best).

The SD 1.x/2.x values follow the public anchors for Stable Diffusion 1.x DreamBooth:

- paper (Ruiz et al. 2023): full fine-tune, ~1000 steps, lr 5e-6, λ = 1, ~1000 class images
  ("less can be used");
- diffusers ``examples/dreambooth``: full fine-tune lr 5e-6 for 800 steps with prior preservation
  and 200 class images; LoRA lr 1e-4 for ~500 steps at rank 4–16;
- diffusers' DreamBooth study: faces need a lower lr (1e-6–2e-6) and 800–1200 steps, and training
  the text encoder helps them most;
- no long warm-up: a 500-step warm-up on a 400–800-step run spends most of it below the target lr.

``num_class_images`` on the returned config is the recommended number of class-prior images;
:func:`prior_images_for` gives the same number without building a config. Those images come
from a shared bank per base model and class, so a bigger number costs little after the first job.

SDXL (``FAMILY_RECIPES["sdxl"]``) follows diffusers' SDXL DreamBooth LoRA script (1024 px, LoRA
at lr 1e-4, rank 4–32, text-encoder lr 5e-6) and what the SDXL trainers use for faces and pets
(kohya-ss and ai-toolkit: rank 16–32 for likeness, the text encoders trained at a far lower lr
than the UNet for people, noise offset 0.0357 as SDXL itself was trained with). No full fine-tune:
the 2.6B-parameter UNet and its optimizer state do not fit a 24 GB card, and a rank-64 LoRA is
what the best presets of those trainers use instead.

FLUX.2 klein and Z-Image (``FAMILY_RECIPES["flux2"]``, ``["zimage"]``) are flow-matching
transformers trained by LoRA only (their text encoder is an LLM that is never trained), without
Min-SNR (a DDPM weighting) and without offset noise. Anchors: the Replicate/ostris FLUX trainer
(1000 steps, lr 4e-4, rank 16) for klein; ai-toolkit's Z-Image-Turbo preset (lr 1e-4, rank 16–32:
a distilled model drifts from its few-step behaviour at higher rates) for Z-Image; diffusers'
DreamBooth LoRA scripts for both (prior preservation with λ = 1).

``resolution`` is left at 512 (SD 1.x); pass ``resolution=model.resolution`` for other models.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from worker.engine.errors import EngineInputError
from worker.engine.presets import (  # noqa: F401  (re-exported: the tables live in presets, torch-free)
    _SHARED,
    FAMILY_RECIPES,
    QUALITIES,
    RECIPES,
    SUBJECTS,
    Quality,
    Subject,
    preset,
)
from worker.engine.train import TrainConfig


def _check(subject: str, quality: str) -> tuple[Subject, Quality]:
    if subject not in SUBJECTS:
        raise EngineInputError(f"unknown subject kind {subject!r}: choose one of {', '.join(SUBJECTS)}")
    if quality not in QUALITIES:
        raise EngineInputError(f"unknown quality {quality!r}: choose one of {', '.join(QUALITIES)}")
    return subject, quality  # type: ignore[return-value]


def recipe(subject: Subject, quality: Quality, family: str = "sd", **overrides: Any) -> TrainConfig:
    """The preset config of ``family`` for ``subject`` × ``quality`` with ``overrides`` applied, validated.

    Any :class:`TrainConfig` field can be overridden; an unknown name or a bad value raises
    :class:`EngineInputError` naming it.
    """
    key = _check(subject, quality)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise EngineInputError(f"unknown training setting(s) {', '.join(unknown)}: known ones are "
                               f"{', '.join(sorted(known))}")
    config = TrainConfig(**{**_SHARED, **preset(family, key), **overrides})
    config.validate()
    return config


def prior_images_for(subject: Subject, quality: Quality, family: str = "sd") -> int:
    """The recommended number of class-prior images for the preset (its ``num_class_images``)."""
    return int(preset(family, _check(subject, quality))["num_class_images"])
