"""The base-model families the engine trains, and how a loaded model's family is found.

A model's family is always detected from what is loaded (a built-in's name, a diffusers folder's
``model_index.json``, a single file's keys), never typed by the user. Adding a family: a module
here with a :class:`~worker.engine.families.base.Family` subclass and its built-ins, one line in
:data:`FAMILIES` and in :data:`BUILTINS`, and the contract tests in
``tests/worker/engine/families`` run on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from worker.engine.families import flux2, sd, sdxl, zimage
from worker.engine.families.base import Family

FAMILIES: dict[str, Family] = {family.name: family for family in (sd.StableDiffusion(), sdxl.StableDiffusionXL(),
                                                                  flux2.Flux2Klein(), zimage.ZImage())}

# Built-in name → (family, builder). A builder makes (modules, tokenizers, training schedule,
# resolution) with random weights from the current RNG, given the shipped tiny CLIP tokenizer.
Builder = Callable[[str, Any], tuple[dict[str, torch.nn.Module], dict[str, Any], Any, int]]
BUILTINS: dict[str, tuple[str, Builder]] = {
    "tiny": ("sd", sd.build),
    "sd15-arch": ("sd", sd.build),
    "tiny-sdxl": ("sdxl", sdxl.build),
    "sdxl-arch": ("sdxl", sdxl.build),
    "tiny-flux2": ("flux2", flux2.build),
    "flux2-klein-arch": ("flux2", flux2.build),
    "tiny-zimage": ("zimage", zimage.build),
    "zimage-arch": ("zimage", zimage.build),
}


def family_for_pipeline_class(class_name: str) -> Family | None:
    """The family whose stock pipeline is ``class_name`` (e.g. "StableDiffusionXLPipeline"), or None."""
    for family in FAMILIES.values():
        if family.pipeline_class_name == class_name:
            return family
    return None


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a pipeline made by :meth:`Family.pipeline` (or loaded as a stock pipeline)."""
    family = family_for_pipeline_class(type(pipe).__name__)
    if family is None:
        raise TypeError(f"{type(pipe).__name__} is not the pipeline of a supported family")
    return family


def supported_pipelines() -> str:
    return ", ".join(f"{family.label} ({family.pipeline_class_name})" for family in FAMILIES.values())
