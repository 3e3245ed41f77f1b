"""Tests for prompt packs, prompt expansion and sampling with metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.engine.errors import Cancelled, EngineInputError
from worker.engine.models import BaseModel
from worker.engine.progress import Progress
from worker.engine.prompts import size_for, split_shape, with_shape
from worker.engine.sample import (
    DEFAULT_PACKS,
    PACK_KINDS,
    PROMPT_PACKS,
    expand_prompts,
    pack_templates,
    read_index,
    sample_images,
)


def test_packs_cover_both_kinds_and_name_the_subject() -> None:
    assert PACK_KINDS[DEFAULT_PACKS["pet"]] == "pet"
    assert PACK_KINDS[DEFAULT_PACKS["person"]] == "person"
    all_pet = " ".join(t for name, ts in PROMPT_PACKS.items() if PACK_KINDS[name] == "pet" for t in ts)
    for phrase in ("on the beach", "in the snow", "in the jungle", "santa hat", "chef outfit", "a wet {subject}",
                   "oil painting", "flower crown"):
        assert phrase in all_pet
    assert any("astronaut" in t for t in pack_templates(None, "person"))
    assert all("{subject}" in template for templates in PROMPT_PACKS.values() for template in templates)


def test_unknown_pack_or_kind_is_an_input_error() -> None:
    with pytest.raises(EngineInputError, match="unknown prompt pack 'nope'"):
        pack_templates("nope", "pet")
    with pytest.raises(EngineInputError, match="unknown subject kind"):
        pack_templates(None, "robot")


def test_expand_prompts_places_identifier_and_class_noun() -> None:
    prompts = expand_prompts(["a photo of {subject} on the beach", "a wet {subject}", "on a  skateboard"], "xqz", "dog")
    assert prompts == [
        "a photo of xqz dog on the beach",
        "a wet xqz dog",
        "a photo of xqz dog, on a skateboard",
    ]
    with pytest.raises(EngineInputError, match="empty"):
        expand_prompts(["  "], "xqz", "dog")
    with pytest.raises(EngineInputError):
        expand_prompts(["{subject}"], "", "dog")


def test_sample_images_writes_pngs_with_metadata_and_index(tiny_model: BaseModel, tmp_path: Path) -> None:
    pipe = tiny_model.pipeline()
    # The second prompt asks for a landscape picture: its marker sets the size and is not painted.
    prompts = expand_prompts(["a photo of {subject} on the beach", "a photo of {subject} in the snow (landscape)"],
                             "xqz", "dog")
    events: list[Progress] = []
    records = sample_images(
        pipe, prompts, images_per_prompt=2, out_dir=tmp_path, seed=10, steps=2, guidance=3.0,
        negative_prompt="blurry", batch_size=3, resolution=64, base_model="tiny", progress=events.append,
    )
    assert [r.path.name for r in records] == [f"sample-{i:04d}.png" for i in range(4)]
    snow = "a photo of xqz dog in the snow"
    assert [r.prompt for r in records] == [prompts[0], prompts[0], snow, snow]
    assert [r.seed for r in records] == [10, 11, 12, 13]
    assert events[0].stage == "sampling" and events[-1].step == events[-1].total == 4

    with Image.open(records[0].path) as image:
        assert image.size == (64, 64)
    with Image.open(records[2].path) as image:
        assert image.size == (64, 48)
        text = dict(image.text)  # type: ignore[attr-defined]
    chunk = json.loads(text["studio"])
    assert chunk["prompt"] == snow and chunk["seed"] == 12 and chunk["steps"] == 2
    assert (chunk["width"], chunk["height"]) == (64, 48)
    assert chunk["guidance"] == 3.0 and chunk["negative_prompt"] == "blurry" and chunk["base_model"] == "tiny"
    assert "Seed: 12" in text["parameters"] and text["parameters"].startswith(snow)

    index = read_index(tmp_path)
    assert [entry["file"] for entry in index] == [r.path.name for r in records]
    assert index[3]["seed"] == 13


def test_same_seed_same_image_and_new_calls_append(tiny_model: BaseModel, tmp_path: Path) -> None:
    pipe = tiny_model.pipeline()
    settings = dict(images_per_prompt=1, steps=2, resolution=64, base_model="tiny", batch_size=2)
    first = sample_images(pipe, ["a xqz dog"], out_dir=tmp_path, seed=5, **settings)  # type: ignore[arg-type]
    again = sample_images(pipe, ["a xqz dog", "a xqz dog"], out_dir=tmp_path, seed=5, **settings)  # type: ignore[arg-type]
    assert [r.path.name for r in again] == ["sample-0001.png", "sample-0002.png"]
    assert [r.seed for r in again] == [5, 6]
    pixels = [np.asarray(Image.open(r.path), dtype=np.int16) for r in (first[0], *again)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    assert np.abs(pixels[1] - pixels[2]).max() > 1
    assert len(read_index(tmp_path)) == 3


def test_sampling_checks_arguments_and_cancel(tiny_model: BaseModel, tmp_path: Path) -> None:
    pipe = tiny_model.pipeline()
    common = dict(out_dir=tmp_path, seed=0, steps=2, base_model="tiny")
    with pytest.raises(EngineInputError, match="no prompts"):
        sample_images(pipe, [], images_per_prompt=1, resolution=64, **common)  # type: ignore[arg-type]
    with pytest.raises(EngineInputError, match="images per prompt"):
        sample_images(pipe, ["a dog"], images_per_prompt=0, resolution=64, **common)  # type: ignore[arg-type]
    with pytest.raises(EngineInputError, match="multiple of 8"):
        sample_images(pipe, ["a dog"], images_per_prompt=1, resolution=30, **common)  # type: ignore[arg-type]
    with pytest.raises(Cancelled):
        sample_images(pipe, ["a dog"], images_per_prompt=1, resolution=64, should_cancel=lambda: True,
                      **common)  # type: ignore[arg-type]


def test_shape_markers_set_the_size_and_are_not_painted() -> None:
    assert split_shape("a photo of {subject} in the snow (landscape)") == ("a photo of {subject} in the snow",
                                                                             "landscape")
    assert split_shape("an oil painting portrait of {subject}") == ("an oil painting portrait of {subject}", "square")
    assert with_shape("a photo of {subject} (landscape)", "portrait") == "a photo of {subject} (portrait)"
    assert size_for("portrait", 64) == (48, 64) and size_for("landscape", 1024) == (1024, 768)
    assert size_for("landscape", 512) == (512, 384) and size_for("square", 768) == (768, 768)
    # Packs carry their shape on every prompt: people's portraits are taller than wide.
    assert all(split_shape(prompt)[1] == "portrait" for prompt in PROMPT_PACKS["portrait-classics"])
    assert all(split_shape(prompt)[1] == "square" for prompt in PROMPT_PACKS["pet-dreambooth"])

