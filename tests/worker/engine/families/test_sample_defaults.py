"""Each checkpoint samples with the steps and guidance it was made for: distilled or not."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from worker.engine.models import BaseModel, build_builtin


@pytest.fixture(scope="module")
def flux2() -> BaseModel:
    return build_builtin("tiny-flux2", seed=0, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def zimage() -> BaseModel:
    return build_builtin("tiny-zimage", seed=0, device=torch.device("cpu"), dtype=torch.float32)


def as_loaded_from(model: BaseModel, spec: str) -> BaseModel:
    """The model as if loaded from ``spec`` rather than built in."""
    return dataclasses.replace(model, spec=spec, source_info={"source": spec})


def test_a_distilled_klein_samples_in_4_steps_and_its_base_in_50_with_guidance(flux2: BaseModel,
                                                                              tmp_path: Path) -> None:
    assert flux2.family.sample_defaults(flux2) == (4, 1.0)  # the built-in stands for klein 4B
    distilled, base = tmp_path / "klein-4b", tmp_path / "klein-base-4b"
    for folder, is_distilled in ((distilled, True), (base, False)):
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline",
                                                             "is_distilled": is_distilled}))
    assert flux2.family.sample_defaults(as_loaded_from(flux2, str(distilled))) == (4, 1.0)
    assert flux2.family.sample_defaults(as_loaded_from(flux2, str(base))) == (50, 4.0)


def test_z_image_turbo_samples_in_9_steps_without_guidance_and_the_base_with_it(zimage: BaseModel) -> None:
    family = zimage.family
    assert family.sample_defaults(zimage) == (9, 0.0)
    assert family.sample_defaults(as_loaded_from(zimage, "Tongyi-MAI/Z-Image-Turbo")) == (9, 0.0)
    assert family.sample_defaults(as_loaded_from(zimage, "/models/z_image_turbo_bf16.safetensors")) == (9, 0.0)
    assert family.sample_defaults(as_loaded_from(zimage, "Tongyi-MAI/Z-Image")) == (50, 4.0)


def test_the_unet_families_keep_their_own_defaults() -> None:
    tiny = build_builtin("tiny", seed=0)
    assert tiny.family.sample_defaults(tiny) == (25, 7.5)
