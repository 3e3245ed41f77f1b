"""The adapter onto worker/engine: the lighter settings reach the engine's own parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from worker.engine import job as engine_job
from worker.engine.spec import JobSpec
from worker.tasks.engine_adapter import (
    DiffusersEngine,
    GenerationInputs,
    lighter_generation,
    lighter_training,
)


def test_lighter_training_reaches_the_job_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(engine_job, "run_job", lambda spec, model, **kwargs: seen.setdefault("spec", spec))
    inputs = JobSpec(photos=[tmp_path / "a.jpg"], class_noun="dog", subject_kind="pet",
                     work_dir=tmp_path / "work", bank_root=tmp_path / "bank")
    lightened = lighter_training(inputs)
    assert lightened is not None
    DiffusersEngine().train(lightened[0], object(), lambda event: None, lambda: False)  # type: ignore[arg-type]
    spec = seen["spec"]
    assert spec.batch_size == 1 and spec.train_overrides["gradient_checkpointing"] is True
    assert inputs.train_overrides == {}  # the original inputs are left as they were


def test_lighter_generation_reaches_generate_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(engine_job, "generate_more", lambda *args, **kwargs: seen.update(kwargs) or [])
    inputs = GenerationInputs(run_dir=tmp_path, prompts=["a photo of {subject}"], identifier="qzx", class_noun="dog",
                              images_per_prompt=2, out_dir=tmp_path / "out")
    lightened = lighter_generation(inputs)
    assert lightened is not None and lighter_generation(lightened[0]) is None
    DiffusersEngine().generate(lightened[0], object(), lambda event: None, lambda: False)  # type: ignore[arg-type]
    assert seen["batch_size"] == 1


def test_free_memory_empties_the_gpu_allocators_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    DiffusersEngine().free_memory()
    assert emptied == []  # no GPU: nothing to empty
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    DiffusersEngine().free_memory()
    assert emptied == [True]
