"""Training presets."""

from __future__ import annotations

import pytest

from worker.engine.errors import EngineInputError
from worker.engine.recipes import QUALITIES, SUBJECTS, prior_images_for, recipe
from worker.engine.train import TrainConfig


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("quality", QUALITIES)
def test_every_preset_is_valid_and_grounded(subject: str, quality: str) -> None:
    config = recipe(subject, quality)  # type: ignore[arg-type]
    assert isinstance(config, TrainConfig)
    config.validate()
    assert config.with_prior and config.prior_loss_weight == 1.0
    assert config.num_class_images == prior_images_for(subject, quality) >= 100  # type: ignore[arg-type]
    # No warm-up that eats a large share of a short run.
    assert config.lr_warmup_steps <= config.steps // 10
    if config.method == "lora":
        assert config.learning_rate == 1e-4
        assert 300 <= config.steps <= 800
    else:
        assert 1e-6 <= config.learning_rate <= 5e-6
        assert 800 <= config.steps <= 1200


def test_presets_grow_with_quality() -> None:
    for subject in SUBJECTS:
        steps = [recipe(subject, q).steps for q in QUALITIES]  # type: ignore[arg-type]
        assert steps == sorted(steps)
        assert recipe(subject, "best").method == "full"  # type: ignore[arg-type]


def test_people_train_the_text_encoder_and_use_the_face_learning_rate() -> None:
    assert all(recipe("person", q).train_text_encoder for q in QUALITIES)
    assert not any(recipe("pet", q).train_text_encoder for q in QUALITIES)
    assert recipe("person", "best").learning_rate <= 2e-6
    assert recipe("pet", "best").learning_rate == 5e-6


def test_overrides_apply_to_any_field() -> None:
    config = recipe("pet", "fast", steps=50, resolution=64, preview_prompts=["a photo of sks dog"], preview_every=10)
    assert (config.steps, config.resolution, config.preview_every) == (50, 64, 10)
    assert config.rank == recipe("pet", "fast").rank


def test_unknown_override_is_named() -> None:
    with pytest.raises(EngineInputError, match="learnig_rate"):
        recipe("pet", "fast", learnig_rate=1e-3)


def test_bad_override_value_is_named() -> None:
    with pytest.raises(EngineInputError, match="steps"):
        recipe("pet", "fast", steps=0)


@pytest.mark.parametrize(("subject", "quality", "named"), [("horse", "fast", "horse"), ("pet", "ultra", "ultra")])
def test_unknown_preset_is_named(subject: str, quality: str, named: str) -> None:
    with pytest.raises(EngineInputError, match=named):
        recipe(subject, quality)  # type: ignore[arg-type]
    with pytest.raises(EngineInputError, match=named):
        prior_images_for(subject, quality)  # type: ignore[arg-type]


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("quality", QUALITIES)
def test_sdxl_presets_follow_the_sdxl_anchors(subject: str, quality: str) -> None:
    config = recipe(subject, quality, "sdxl")  # type: ignore[arg-type]
    assert config.resolution == 1024
    assert config.method == "lora"  # a full SDXL fine-tune does not fit a 24 GB card
    assert 4 <= config.rank <= 64 and 5e-5 <= config.learning_rate <= 1e-4
    assert config.offset_noise == pytest.approx(0.0357)
    if config.train_text_encoder:
        assert config.text_encoder_lr == 5e-6
    assert config.num_class_images == prior_images_for(subject, quality, "sdxl")  # type: ignore[arg-type]
    assert recipe(subject, quality, "sdxl", rank=4, resolution=64).rank == 4  # type: ignore[arg-type]


def test_people_on_sdxl_train_both_text_encoders_and_get_the_higher_ranks() -> None:
    assert all(recipe("person", q, "sdxl").train_text_encoder for q in QUALITIES)
    ranks = [recipe("person", q, "sdxl").rank for q in QUALITIES]
    assert ranks == sorted(ranks) and ranks[-1] >= 32


def test_the_demo_models_paint_at_most_a_few_class_priors() -> None:
    from types import SimpleNamespace

    from worker.engine.job import recipe_prior_images
    from worker.engine.presets import DEMO_PRIOR_IMAGES

    config = recipe("pet", "balanced")
    assert recipe_prior_images(config, SimpleNamespace(is_demo=True)) == DEMO_PRIOR_IMAGES < config.num_class_images  # type: ignore[arg-type]
    assert recipe_prior_images(config, SimpleNamespace(is_demo=False)) == config.num_class_images == 200  # type: ignore[arg-type]
