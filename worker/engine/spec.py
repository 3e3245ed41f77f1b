"""What a person asked for, as plain data: the :class:`JobSpec` the CLI and the Celery task both build.

Torch-free, so the task modules that build one import without the ML stack. The default negative
prompts live here for the same reason; ``priors`` and ``sample`` use them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_NEGATIVE = "blurry, low quality, deformed, watermark, text, cropped, out of frame"  # class priors
DEFAULT_SAMPLE_NEGATIVE = "blurry, low quality, deformed, watermark, text"  # the gallery


@dataclass
class JobSpec:
    """What a person asked for: their photos, what the subject is, and how to train and sample.

    ``train_overrides`` are :class:`TrainConfig` fields that replace the recipe's values
    (``method``, ``steps``, ``learning_rate``, ``rank``, ...). ``prior_images`` (None: the recipe's
    ``num_class_images``), ``resolution`` (None: the base model's) and ``seed`` win over both.
    ``prompts`` are free prompts; ``{subject}`` marks where "[V] [class noun]" goes. ``guidance``
    and ``sample_steps`` are the gallery's; ``prior_*`` the class-prior bank's (they key the bank);
    None means the base model family's own default (SD: 25 steps at 7.5; SDXL: 30 at 5.0).
    """

    photos: list[Path]
    class_noun: str
    subject_kind: Literal["pet", "person"]
    work_dir: Path
    bank_root: Path
    quality: str = "balanced"
    train_overrides: dict[str, Any] = field(default_factory=dict)
    prior_images: int | None = None
    pack: str | None = None
    prompts: list[str] = field(default_factory=list)
    images_per_prompt: int = 4
    identifier: str | None = None
    seed: int = 0
    resolution: int | None = None
    sample_steps: int | None = None
    guidance: float | None = None
    score: bool = True
    prior_steps: int | None = None
    prior_guidance: float | None = None  # kept apart from ``guidance``: it is part of the bank's key
    prior_negative_prompt: str = DEFAULT_NEGATIVE
    sample_negative_prompt: str = DEFAULT_SAMPLE_NEGATIVE
    batch_size: int = 4  # images per sampling call, for the priors and the gallery
