"""Tests for the class-prior bank."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine import priors
from worker.engine.errors import Cancelled, EngineInputError
from worker.engine.models import BaseModel, build_builtin
from worker.engine.priors import PriorBankError, fill_prior_bank, is_unusable, is_valid_bank_image
from worker.engine.progress import Progress

FAST: dict[str, Any] = {"resolution": 64, "steps": 2, "batch_size": 2}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_fill_generates_then_a_second_fill_reuses_everything(tiny_model: BaseModel, tmp_path: Path) -> None:
    events: list[Progress] = []
    first = fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 3, progress=events.append, **FAST)
    assert (first.generated, first.reused) == (3, 0)
    assert first.directory == tmp_path / first.key
    assert [p.name for p in first.images] == ["00000.png", "00001.png", "00002.png"]
    assert all(is_valid_bank_image(p, 64) for p in first.images)
    assert {e.stage for e in events} == {"priors"}
    assert events[0].reused == 0 and events[-1].step == events[-1].total == 3

    meta = json.loads((first.directory / "meta.json").read_text())
    assert meta["class_prompt"] == "a photo of a dog" and meta["sampler"] == "dpmsolver++"
    assert meta["model_fingerprint"] == tiny_model.fingerprint and meta["steps"] == 2

    again: list[Progress] = []
    second = fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 3, progress=again.append, **FAST)
    assert (second.generated, second.reused, second.key) == (0, 3, first.key)
    assert again[0].reused == 3


def test_growing_the_bank_makes_the_same_images_a_full_fill_would(tiny_model: BaseModel, tmp_path: Path) -> None:
    small = fill_prior_bank(tiny_model, tmp_path / "a", "a photo of a cat", 2, **FAST)
    grown = fill_prior_bank(tiny_model, tmp_path / "a", "a photo of a cat", 3, **FAST)
    assert (grown.generated, grown.reused) == (1, 2)
    full = fill_prior_bank(tiny_model, tmp_path / "b", "a photo of a cat", 3, **{**FAST, "batch_size": 3})
    for mine, theirs in zip(grown.images, full.images, strict=True):
        assert np.abs(_pixels(mine) - _pixels(theirs)).max() <= 2  # batching may move a value by a rounding step
    assert small.images == grown.images[:2]


def test_key_depends_on_every_setting(tiny_model: BaseModel, tmp_path: Path) -> None:
    base = fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 0, **FAST)
    keys = {
        base.key,
        fill_prior_bank(tiny_model, tmp_path, "a photo of a cat", 0, **FAST).key,
        fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 0, **{**FAST, "steps": 3}).key,
        fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 0, **FAST, guidance=5.0).key,
        fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 0, **FAST, negative_prompt="").key,
        fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 0, **{**FAST, "resolution": 72}).key,
    }
    assert len(keys) == 6


def test_black_images_are_refused_and_redrawn(tiny_model: BaseModel, tmp_path: Path, monkeypatch) -> None:
    real_render = priors.render_batch
    calls: list[list[int]] = []

    def black_first(pipe: Any, prompt: str, negative: str, seeds: list[int], **kwargs: Any) -> np.ndarray:
        calls.append(seeds)
        images = real_render(pipe, prompt, negative, seeds, **kwargs)
        if len(calls) == 1:
            images[0] = 0.0  # the first image of the first batch comes out black
        return images

    monkeypatch.setattr(priors, "render_batch", black_first)
    result = fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 2, **FAST)
    assert result.generated == 2
    assert len(calls) == 2 and len(calls[1]) == 1
    assert calls[1] == [priors.image_seed(result.key, 0, attempt=1)]
    for path in result.images:
        assert is_unusable(_pixels(path) / 255.0) is None


def test_a_model_that_only_makes_black_images_fails_clearly(tiny_model: BaseModel, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(priors, "render_batch", lambda pipe, p, n, seeds, **kw: np.zeros((len(seeds), 64, 64, 3)))
    with pytest.raises(PriorBankError, match="black or non-finite"):
        fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 1, **FAST)
    assert list((tmp_path).glob("*/*.png")) == []


def test_unusable_detection() -> None:
    assert is_unusable(np.zeros((8, 8, 3))) == "black"
    assert is_unusable(np.full((8, 8, 3), np.nan)) == "non-finite values"
    assert is_unusable(np.full((8, 8, 3), 0.5)) is None
    dark_but_detailed = np.zeros((8, 8, 3))
    dark_but_detailed[::2] = 0.3
    assert is_unusable(dark_but_detailed) is None


def test_a_torn_image_is_regenerated(tiny_model: BaseModel, tmp_path: Path) -> None:
    first = fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 2, **FAST)
    first.images[1].write_bytes(first.images[1].read_bytes()[:50])
    again = fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 2, **FAST)
    assert (again.generated, again.reused) == (1, 1)
    assert is_valid_bank_image(again.images[1], 64)


def test_bad_arguments(tiny_model: BaseModel, tmp_path: Path) -> None:
    with pytest.raises(EngineInputError, match="class prompt"):
        fill_prior_bank(tiny_model, tmp_path, " ", 1, **FAST)
    with pytest.raises(EngineInputError, match="multiple of 8"):
        fill_prior_bank(tiny_model, tmp_path, "a dog", 1, **{**FAST, "resolution": 60})
    with pytest.raises(EngineInputError, match="steps"):
        fill_prior_bank(tiny_model, tmp_path, "a dog", 1, **{**FAST, "steps": 0})


def test_cancel_stops_the_fill(tiny_model: BaseModel, tmp_path: Path) -> None:
    with pytest.raises(Cancelled):
        fill_prior_bank(tiny_model, tmp_path, "a photo of a dog", 4, should_cancel=lambda: True, **FAST)


def _fill_in_another_process(bank_root: str, count: int, queue: Any, start_together: Any) -> None:
    torch.set_num_threads(1)
    model = build_builtin("tiny", seed=0, device=torch.device("cpu"), dtype=torch.float32)
    start_together.wait(timeout=60)  # both processes reach the bank at the same moment
    result = fill_prior_bank(model, Path(bank_root), "a photo of a dog", count, **FAST)
    queue.put((result.generated, result.reused))


def test_two_processes_filling_one_bank_leave_exactly_k_valid_images(tmp_path: Path, monkeypatch) -> None:
    count = 3
    # models.fingerprint hashes diffusers' `_use_default_values` list, whose order follows Python's
    # per-process string hashing; pin the hash seed so both children compute the same bank key.
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    context = multiprocessing.get_context("spawn")  # fork and torch's thread pools do not mix
    queue = context.Queue()
    barrier = context.Barrier(2)
    workers = [context.Process(target=_fill_in_another_process, args=(str(tmp_path), count, queue, barrier))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    outcomes = sorted(queue.get(timeout=5) for _ in workers)
    assert outcomes == [(0, count), (count, 0)]  # one generated everything, the other waited and reused
    (bank,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    images = sorted(bank.glob("*.png"))
    assert [p.name for p in images] == [f"{i:05d}.png" for i in range(count)]
    assert all(is_valid_bank_image(p, 64) for p in images)
    assert list(bank.glob("*.tmp")) == []
