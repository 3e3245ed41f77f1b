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
from typing import Any, Literal

from worker.engine.errors import EngineInputError
from worker.engine.train import TrainConfig

Subject = Literal["pet", "person"]
Quality = Literal["fast", "balanced", "best"]
SUBJECTS: tuple[Subject, ...] = ("pet", "person")
QUALITIES: tuple[Quality, ...] = ("fast", "balanced", "best")

# Min-SNR-γ with γ = 5 (Hang et al. 2023) speeds convergence and costs nothing.
_SHARED: dict[str, Any] = {"min_snr_gamma": 5.0, "prior_loss_weight": 1.0, "with_prior": True, "batch_size": 1,
                           "lr_warmup_steps": 0}

RECIPES: dict[tuple[Subject, Quality], dict[str, Any]] = {
    # Pets: LoRA on the UNet at the diffusers LoRA anchor; the best preset is the diffusers
    # full fine-tune with prior preservation. A frozen text encoder is enough for animals.
    ("pet", "fast"): {"method": "lora", "rank": 8, "learning_rate": 1e-4, "steps": 300,
                      "num_class_images": 100, "checkpoint_every": 100},
    ("pet", "balanced"): {"method": "lora", "rank": 16, "learning_rate": 1e-4, "steps": 500,
                          "num_class_images": 200, "checkpoint_every": 100},
    ("pet", "best"): {"method": "full", "learning_rate": 5e-6, "steps": 800, "num_class_images": 200,
                      "checkpoint_every": 200},
    # People: faces are judged harshly, so more steps, a higher LoRA rank and a trained text
    # encoder (LoRA on its attention, at half the UNet's lr); the best preset is a full fine-tune
    # of both at the faces' 2e-6 over 1000 steps with a larger prior set.
    ("person", "fast"): {"method": "lora", "rank": 16, "learning_rate": 1e-4, "steps": 500,
                         "train_text_encoder": True, "text_encoder_lr": 5e-5, "num_class_images": 100,
                         "checkpoint_every": 100},
    ("person", "balanced"): {"method": "lora", "rank": 32, "learning_rate": 1e-4, "steps": 800,
                             "train_text_encoder": True, "text_encoder_lr": 5e-5, "num_class_images": 200,
                             "checkpoint_every": 100},
    ("person", "best"): {"method": "full", "learning_rate": 2e-6, "steps": 1000, "train_text_encoder": True,
                         "text_encoder_lr": 2e-6, "num_class_images": 300, "checkpoint_every": 200},
}


# Per family: the presets that differ from SD's, each replacing SD's values for its key.
_SDXL_SHARED: dict[str, Any] = {"resolution": 1024, "offset_noise": 0.0357, "method": "lora", "text_encoder_lr": 5e-6}
FAMILY_RECIPES: dict[str, dict[tuple[Subject, Quality], dict[str, Any]]] = {
    "sdxl": {
        ("pet", "fast"): {**_SDXL_SHARED, "rank": 8, "learning_rate": 1e-4, "steps": 300, "num_class_images": 100,
                          "checkpoint_every": 100},
        ("pet", "balanced"): {**_SDXL_SHARED, "rank": 16, "learning_rate": 1e-4, "steps": 500,
                              "num_class_images": 200, "checkpoint_every": 100},
        ("pet", "best"): {**_SDXL_SHARED, "rank": 32, "learning_rate": 1e-4, "steps": 800, "num_class_images": 200,
                          "train_text_encoder": True, "checkpoint_every": 200},
        ("person", "fast"): {**_SDXL_SHARED, "rank": 16, "learning_rate": 1e-4, "steps": 500,
                             "train_text_encoder": True, "num_class_images": 100, "checkpoint_every": 100},
        ("person", "balanced"): {**_SDXL_SHARED, "rank": 32, "learning_rate": 1e-4, "steps": 800,
                                 "train_text_encoder": True, "num_class_images": 200, "checkpoint_every": 100},
        ("person", "best"): {**_SDXL_SHARED, "rank": 64, "learning_rate": 5e-5, "steps": 1200,
                             "train_text_encoder": True, "num_class_images": 300, "checkpoint_every": 200},
    },
}


def _flow_presets(learning_rate: float) -> dict[tuple[Subject, Quality], dict[str, Any]]:
    shared: dict[str, Any] = {"method": "lora", "min_snr_gamma": None, "offset_noise": 0.0, "resolution": 1024,
                              "train_text_encoder": False, "learning_rate": learning_rate}
    return {
        ("pet", "fast"): {**shared, "rank": 16, "steps": 500, "num_class_images": 100, "checkpoint_every": 100},
        ("pet", "balanced"): {**shared, "rank": 16, "steps": 1000, "num_class_images": 200, "checkpoint_every": 200},
        ("pet", "best"): {**shared, "rank": 32, "steps": 1500, "learning_rate": learning_rate / 2,
                          "num_class_images": 200, "checkpoint_every": 250},
        ("person", "fast"): {**shared, "rank": 16, "steps": 750, "num_class_images": 100, "checkpoint_every": 150},
        ("person", "balanced"): {**shared, "rank": 32, "steps": 1000, "num_class_images": 200,
                                 "checkpoint_every": 200},
        ("person", "best"): {**shared, "rank": 64, "steps": 1500, "learning_rate": learning_rate / 2,
                             "num_class_images": 300, "checkpoint_every": 250},
    }


FAMILY_RECIPES["flux2"] = _flow_presets(4e-4)
FAMILY_RECIPES["zimage"] = _flow_presets(1e-4)


def _check(subject: str, quality: str) -> tuple[Subject, Quality]:
    if subject not in SUBJECTS:
        raise EngineInputError(f"unknown subject kind {subject!r}: choose one of {', '.join(SUBJECTS)}")
    if quality not in QUALITIES:
        raise EngineInputError(f"unknown quality {quality!r}: choose one of {', '.join(QUALITIES)}")
    return subject, quality  # type: ignore[return-value]


def _preset(family: str, key: tuple[Subject, Quality]) -> dict[str, Any]:
    presets = FAMILY_RECIPES.get(family)
    return dict(presets[key]) if presets is not None else dict(RECIPES[key])


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
    config = TrainConfig(**{**_SHARED, **_preset(family, key), **overrides})
    config.validate()
    return config


def prior_images_for(subject: Subject, quality: Quality, family: str = "sd") -> int:
    """The recommended number of class-prior images for the preset (its ``num_class_images``)."""
    return int(_preset(family, _check(subject, quality))["num_class_images"])
