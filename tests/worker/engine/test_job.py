"""End-to-end tests of the job orchestration on the tiny model (few steps, 64 px, few prior images)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from worker.engine import job as job_module
from worker.engine.errors import Cancelled, EngineInputError
from worker.engine.evaluate import Scorer
from worker.engine.job import JobSpec, generate_more, job_prompts, run_details, run_job, training_config
from worker.engine.models import BaseModel, build_builtin
from worker.engine.progress import Progress
from worker.engine.sample import DEFAULT_PACKS, PROMPT_PACKS, expand_prompts, read_index

FAST_TRAIN: dict[str, Any] = {"method": "lora", "steps": 2, "rank": 4, "checkpoint_every": 0, "preview_every": 0}


def _spec(given_photos: list[Path], root: Path, work: str, **changes: Any) -> JobSpec:
    values: dict[str, Any] = {
        "photos": given_photos, "class_noun": "dog", "subject_kind": "pet", "work_dir": root / work,
        "bank_root": root / "bank", "quality": "fast", "train_overrides": dict(FAST_TRAIN), "prior_images": 2,
        "prompts": ["a photo of {subject} on the beach", "wearing a santa hat"], "images_per_prompt": 2,
        "sample_steps": 2, "prior_steps": 2, "batch_size": 2,
    }
    values.update(changes)
    return JobSpec(**values)


def _stages(events: list[Progress]) -> list[str]:
    order: list[str] = []
    for event in events:
        if not order or order[-1] != event.stage:
            order.append(event.stage)
    return order


def test_lora_job_end_to_end_then_a_second_job_reuses_the_priors(
    tiny_model: BaseModel, subject_photos: list[Path], tmp_path: Path
) -> None:
    events: list[Progress] = []
    result = run_job(_spec(subject_photos, tmp_path, "job1"), tiny_model, progress=events.append)

    assert _stages(events) == ["preparing", "priors", "training", "sampling", "scoring"]
    assert (result.prior_generated, result.prior_reused) == (2, 0)
    assert result.instance_prompt == f"a photo of {result.identifier} dog"
    assert result.class_prompt == "a photo of a dog"
    assert result.photo_problems == [] and result.train.final_step == 2

    work = tmp_path / "job1"
    assert len(list((work / "prepared").glob("photo-*.png"))) == 4
    assert result.run_dir == work / "run" and (work / "run" / "pytorch_lora_weights.safetensors").is_file()
    subject = f"{result.identifier} dog"
    assert [r.prompt for r in result.images] == [f"a photo of {subject} on the beach"] * 2 + \
        [f"a photo of {subject}, wearing a santa hat"] * 2
    assert [r.seed for r in result.images] == [0, 1, 2, 3]
    for record in result.images:
        assert record.path.parent == work / "samples"
        with Image.open(record.path) as image:
            assert image.size == (64, 64)
            assert json.loads(image.text["studio"])["seed"] == record.seed  # type: ignore[attr-defined]
    assert len(read_index(work / "samples")) == 4

    assert len(result.scores) == 4 and sorted(result.ranking) == [0, 1, 2, 3]
    scores_file = json.loads((work / "samples" / "scores.json").read_text())
    assert [entry["file"] for entry in scores_file["images"]] == [r.path.name for r in result.images]

    run = json.loads((work / "run" / "run.json").read_text())
    info = run["run_info"]
    assert info["identifier"] == result.identifier and info["class_noun"] == "dog"
    assert info["prior"]["generated"] == 2 and info["base_model"]["fingerprint"] == tiny_model.fingerprint
    assert info["prompts"] == [r.prompt for r in result.images[::2]]

    second = run_job(_spec(subject_photos, tmp_path, "job2"), tiny_model)
    assert (second.prior_generated, second.prior_reused) == (0, 2)
    assert second.identifier == result.identifier  # same seed, same tokenizer


def test_full_fine_tune_end_to_end(tiny_model: BaseModel, subject_photos: list[Path], tmp_path: Path) -> None:
    spec = _spec(subject_photos, tmp_path, "full", train_overrides={**FAST_TRAIN, "method": "full", "steps": 1},
                 prompts=["{subject} in the snow"], images_per_prompt=1, score=False)
    result = run_job(spec, tiny_model)
    assert (result.run_dir / "unet").is_dir()
    assert len(result.images) == 1 and result.images[0].path.is_file()
    assert result.scores == [] and result.ranking == []


def test_job_prompts_pick_the_pack_and_free_prompts(subject_photos: list[Path], tmp_path: Path) -> None:
    default = job_prompts(_spec(subject_photos, tmp_path, "p", prompts=[]), "xqz", "dog")
    assert default == expand_prompts(PROMPT_PACKS[DEFAULT_PACKS["pet"]], "xqz", "dog")
    person = job_prompts(_spec(subject_photos, tmp_path, "p", prompts=[], subject_kind="person"), "xqz", "man")
    assert person == expand_prompts(PROMPT_PACKS[DEFAULT_PACKS["person"]], "xqz", "man")
    free_only = job_prompts(_spec(subject_photos, tmp_path, "p", prompts=["on a boat"]), "xqz", "dog")
    assert free_only == ["a photo of xqz dog, on a boat"]
    both = job_prompts(_spec(subject_photos, tmp_path, "p", prompts=["on a boat"], pack="pet-fun"), "xqz", "dog")
    assert both == [*expand_prompts(PROMPT_PACKS["pet-fun"], "xqz", "dog"), "a photo of xqz dog, on a boat"]


def test_no_prior_images_trains_without_the_prior_term(
    tiny_model: BaseModel, subject_photos: list[Path], tmp_path: Path
) -> None:
    spec = _spec(subject_photos, tmp_path, "noprior", prompts=["{subject}"], images_per_prompt=1, score=False,
                 train_overrides={**FAST_TRAIN, "steps": 1}, prior_images=0)
    result = run_job(spec, tiny_model)
    assert (result.prior_generated, result.prior_reused) == (0, 0)
    assert json.loads((result.run_dir / "run.json").read_text())["config"]["with_prior"] is False


def test_a_crashed_job_resumes_training_from_its_checkpoint(
    tiny_model: BaseModel, subject_photos: list[Path], tmp_path: Path
) -> None:
    overrides = {**FAST_TRAIN, "steps": 3, "checkpoint_every": 1}
    checkpoints: list[Progress] = []

    def cancel_after_first_checkpoint() -> bool:
        return bool(checkpoints)

    with pytest.raises(Cancelled):
        run_job(_spec(subject_photos, tmp_path, "crash", train_overrides=overrides), tiny_model,
                progress=lambda e: checkpoints.append(e) if e.checkpoint else None,
                should_cancel=cancel_after_first_checkpoint)
    spec = _spec(subject_photos, tmp_path, "crash", train_overrides=overrides, images_per_prompt=1, score=False)
    resumed = run_job(spec, tiny_model)
    assert resumed.train.resumed_from is not None and resumed.train.resumed_from >= 1
    assert resumed.train.final_step == 3 and resumed.prior_reused == 2
    assert len(resumed.images) == 2 and len(read_index(tmp_path / "crash" / "samples")) == 2
    again = run_job(spec, tiny_model)  # a finished job run again: same gallery, not a doubled one
    assert [r.path.name for r in again.images] == [r.path.name for r in resumed.images]
    assert len(read_index(tmp_path / "crash" / "samples")) == 2


def test_a_run_goes_on_from_its_checkpoint_with_the_lighter_memory_settings(
    tiny_model: BaseModel, subject_photos: list[Path], tmp_path: Path
) -> None:
    """What the worker does after running out of GPU memory: the same job again with gradient
    checkpointing and one image per sampling call continues from the heavier run's checkpoint."""
    overrides = {**FAST_TRAIN, "steps": 3, "checkpoint_every": 1}
    checkpoints: list[Progress] = []
    with pytest.raises(Cancelled):
        run_job(_spec(subject_photos, tmp_path, "oom", train_overrides=overrides), tiny_model,
                progress=lambda e: checkpoints.append(e) if e.checkpoint else None,
                should_cancel=lambda: bool(checkpoints))
    lighter = {**overrides, "gradient_checkpointing": True}
    spec = _spec(subject_photos, tmp_path, "oom", train_overrides=lighter, batch_size=1, images_per_prompt=1,
                 score=False)
    resumed = run_job(spec, tiny_model)
    assert resumed.train.resumed_from is not None and resumed.train.resumed_from >= 1
    assert resumed.train.final_step == 3 and len(resumed.images) == 2


def test_generate_more_appends_and_checks_the_base_model(
    tiny_model: BaseModel, subject_photos: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    result = run_job(_spec(subject_photos, tmp_path, "more", images_per_prompt=1, score=False), tiny_model)
    details = run_details(result.run_dir)
    assert details["identifier"] == result.identifier and details["base_model"] == "tiny"
    assert details["class_noun"] == "dog" and details["resolution"] == 64
    more = generate_more(tiny_model, result.run_dir, ["a photo of {subject} on the moon"],
                         identifier=result.identifier, class_noun="dog", images_per_prompt=2,
                         out_dir=tmp_path / "more" / "samples", seed=7, steps=2)
    assert [r.path.name for r in more] == ["sample-0002.png", "sample-0003.png"]
    assert more[0].prompt == f"a photo of {result.identifier} dog on the moon"
    other_weights = build_builtin("tiny", seed=1)
    with caplog.at_level(logging.WARNING, logger="worker.engine.job"):
        generate_more(other_weights, result.run_dir, ["{subject}"], identifier=result.identifier, class_noun="dog",
                      images_per_prompt=1, out_dir=tmp_path / "x", seed=0, steps=1)
    assert "fingerprint" in caplog.text
    other_spec = build_builtin("tiny", seed=0)
    other_spec.spec = "sd15-arch"
    with pytest.raises(EngineInputError, match="was trained on base model 'tiny', not on the loaded 'sd15-arch'"):
        generate_more(other_spec, result.run_dir, ["{subject}"], identifier=result.identifier, class_noun="dog",
                      images_per_prompt=1, out_dir=tmp_path / "x", seed=0, steps=1)


def test_a_given_scorer_is_used(tiny_model: BaseModel, subject_photos: list[Path], tmp_path: Path) -> None:
    scorer = Scorer.random(seed=3)
    calls: list[int] = []
    real_score = scorer.score

    def counting_score(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_score(*args, **kwargs)

    scorer.score = counting_score  # type: ignore[method-assign]
    run_job(_spec(subject_photos, tmp_path, "scored", images_per_prompt=1), tiny_model, scorer=scorer)
    assert calls == [1]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"class_noun": " "}, "class noun"),
        ({"pack": "nope"}, "unknown prompt pack"),
        ({"identifier": "xqzv"}, "not one token"),
        ({"quality": "ultra"}, "unknown quality"),
        ({"images_per_prompt": 0}, "images per prompt"),
        ({"resolution": 60}, "multiple of 8"),
        ({"photos": []}, "no photos given"),
        ({"train_overrides": {"steps": 0}}, "steps"),
        ({"train_overrides": {"epochs": 3}}, "unknown training setting"),
    ],
)
def test_bad_specs_fail_before_any_work(
    tiny_model: BaseModel, subject_photos: list[Path], tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(EngineInputError, match=message):
        run_job(_spec(subject_photos, tmp_path, "bad", **changes), tiny_model)
    assert not (tmp_path / "bank").exists()


def test_training_shows_previews_by_default_and_honours_the_callers_choice(
    tiny_model: BaseModel, subject_photos: list[Path], tmp_path: Path
) -> None:
    spec = JobSpec(photos=subject_photos, class_noun="dog", subject_kind="pet", work_dir=tmp_path / "w",
                   bank_root=tmp_path / "bank", quality="fast")
    default = training_config(spec, tiny_model, ["a photo of qzx dog on the beach"])
    assert default.preview_prompts == ["a photo of qzx dog on the beach"]
    assert default.preview_every == default.steps // 4

    spec.train_overrides = {"preview_every": 5, "steps": 10}
    chosen = training_config(spec, tiny_model, ["a photo of qzx dog in the snow"])
    assert (chosen.preview_every, chosen.preview_prompts) == (5, ["a photo of qzx dog in the snow"])

    spec.train_overrides = {"preview_every": 0}
    assert training_config(spec, tiny_model, ["a photo of qzx dog"]).preview_every == 0


def test_a_real_model_is_scored_by_the_papers_encoders_when_the_machine_has_them(
    tiny_model: BaseModel, subject_photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_model = dataclasses.replace(tiny_model, is_demo=False)
    monkeypatch.setattr(job_module, "default_scorer", lambda: Scorer.random(seed=5))
    scored = run_job(_spec(subject_photos, tmp_path, "real", images_per_prompt=1), real_model)
    assert len(scored.scores) == len(scored.images) and scored.ranking

    monkeypatch.setattr(job_module, "default_scorer", lambda: None)  # offline: no encoders to be had
    unscored = run_job(_spec(subject_photos, tmp_path, "offline", images_per_prompt=1), real_model)
    assert unscored.scores == [] and unscored.ranking == [] and len(unscored.images) == 2


@pytest.mark.parametrize(("spec", "memory_gb", "expected"), [
    ("tiny", 24.0, False), ("tiny", 8.0, True), ("tiny-sdxl", 24.0, True), ("tiny-sdxl", 80.0, False),
    ("tiny-sdxl", None, False),  # the CPU: no plan for memory
])
def test_small_cards_train_with_gradient_checkpointing_from_the_start(
        subject_photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str,
        memory_gb: float | None, expected: bool) -> None:
    model = build_builtin(spec, seed=0)
    monkeypatch.setattr(job_module, "device_memory_gb", lambda device: memory_gb)
    job = _spec(subject_photos, tmp_path, "work")
    assert training_config(job, model, []).gradient_checkpointing is expected
    chosen = dataclasses.replace(job, train_overrides={**job.train_overrides, "gradient_checkpointing": False})
    assert training_config(chosen, model, []).gradient_checkpointing is False  # the caller's choice wins


@pytest.mark.parametrize(("spec", "memory_gb", "expected"), [
    ("tiny-flux2", 24.0, "int8"), ("tiny-flux2", 80.0, "none"), ("tiny-zimage", 16.0, "int8"),
    ("tiny-sdxl", 16.0, "none"), ("tiny-flux2", None, "none"),  # SDXL fits; the CPU has no plan
])
def test_cards_of_24_gb_and_less_keep_a_flow_transformers_base_in_int8(
        subject_photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str,
        memory_gb: float | None, expected: str) -> None:
    model = build_builtin(spec, seed=0)
    monkeypatch.setattr(job_module, "device_memory_gb", lambda device: memory_gb)
    job = _spec(subject_photos, tmp_path, "work")
    assert training_config(job, model, []).quantize_base == expected
    chosen = dataclasses.replace(job, train_overrides={**job.train_overrides, "quantize_base": "none"})
    assert training_config(chosen, model, []).quantize_base == "none"  # the caller's choice wins
