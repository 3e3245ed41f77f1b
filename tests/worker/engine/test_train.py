"""The DreamBooth training loop on the built-in tiny model (64 px, CPU)."""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from worker.engine.errors import Cancelled, EngineInputError, TrainingDiverged
from worker.engine.models import BaseModel
from worker.engine.progress import Progress
from worker.engine.train import (
    CHECKPOINT_MARKER,
    TrainConfig,
    _EpochOrder,
    denoising_loss,
    dreambooth_loss,
    latest_checkpoint,
    load_training_image,
    min_snr_weights,
    train,
)
from worker.engine.weights import KOHYA_LORA_FILE, LORA_WEIGHTS_FILE, RUN_FILE, load_trained_pipeline

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"


def make_class_image(path: Path, seed: int) -> Path:
    """A synthetic class-prior image: flat colour with stripes, unlike the subject photos."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 255, size=3)
    pixels[::8] = rng.integers(0, 255, size=3)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def class_images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "class"
    folder.mkdir()
    return [make_class_image(folder / f"class{i}.png", seed=50 + i) for i in range(4)]


def small_config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {"steps": 4, "resolution": 64, "rank": 4, "learning_rate": 1e-3}
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def run(model: BaseModel, config: TrainConfig, photos: list[Path], classes: list[Path], run_dir: Path,
        **kwargs: object):
    return train(model, config, instance_images=photos, instance_prompt=INSTANCE_PROMPT, class_images=classes,
                 class_prompt=CLASS_PROMPT, run_dir=run_dir, **kwargs)  # type: ignore[arg-type]


def lora_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / LORA_WEIGHTS_FILE))


# ---------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("batch", [1, 2])
def test_min_snr_with_prior_matches_hand_computation(tiny_model: BaseModel, batch: int) -> None:
    alphas_cumprod = tiny_model.noise_scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(batch)
    prediction = torch.randn(2 * batch, 4, 8, 8, generator=generator)
    target = torch.randn(2 * batch, 4, 8, 8, generator=generator)
    # Distinct timesteps in each half: a weight taken from the wrong half changes the result.
    timesteps = torch.tensor([10, 900] if batch == 1 else [10, 900, 50, 600])
    gamma, weight = 5.0, 0.7

    rows = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    snr_weight = torch.minimum(snr, torch.tensor(gamma)) / snr
    expected = (rows[:batch] * snr_weight[:batch]).mean() + weight * (rows[batch:] * snr_weight[batch:]).mean()

    weights = min_snr_weights(timesteps, alphas_cumprod, gamma, "epsilon")
    parts = dreambooth_loss(prediction, target, with_prior=True, prior_loss_weight=weight, weights=weights)
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts.prior is not None
    assert parts.instance.item() == pytest.approx((rows[:batch] * snr_weight[:batch]).mean().item(), rel=1e-6)

    # The public trainers' version weights the B instance rows with all 2B timesteps' weights:
    # at B = 1 it broadcasts to a different number, at B > 1 it cannot even be computed.
    if batch == 1:
        buggy = (rows[:1] * snr_weight).mean() + weight * rows[1:].mean()
        assert abs(buggy.item() - parts.total.item()) > 1e-3
    else:
        with pytest.raises(RuntimeError):
            _ = rows[:batch] * snr_weight


def test_min_snr_weights_for_v_prediction(tiny_model: BaseModel) -> None:
    alphas_cumprod = tiny_model.noise_scheduler.alphas_cumprod
    timesteps = torch.tensor([0, 999])
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    weights = min_snr_weights(timesteps, alphas_cumprod, 5.0, "v_prediction")
    assert torch.allclose(weights, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_loss_without_prior_is_the_plain_mean() -> None:
    prediction, target = torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    parts = dreambooth_loss(prediction, target, with_prior=False)
    assert parts.total.item() == pytest.approx(1.0)
    assert parts.prior is None


def test_prior_weight_scales_the_class_half_only() -> None:
    prediction = torch.cat([torch.ones(1, 4, 2, 2), 2 * torch.ones(1, 4, 2, 2)])
    target = torch.zeros(2, 4, 2, 2)
    parts = dreambooth_loss(prediction, target, with_prior=True, prior_loss_weight=0.5)
    assert parts.instance.item() == pytest.approx(1.0)
    assert parts.total.item() == pytest.approx(1.0 + 0.5 * 4.0)


# ---------------------------------------------------------------------------------------------
# Data


def test_training_image_is_centre_cropped_and_scaled(tmp_path: Path) -> None:
    # 200 x 100, white from x = 75 to 125: resized to 128 x 64 and cropped to x = 32..96, the
    # band lands at 16..48 of the crop, black on either side.
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, 75:125] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    tensor = load_training_image(tmp_path / "wide.png", 64)
    assert tensor.shape == (3, 64, 64)
    assert tensor.is_contiguous()
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert tensor[:, :, 20:44].min().item() == pytest.approx(1.0)
    assert tensor[:, :, :12].max().item() == pytest.approx(-1.0)
    assert tensor[:, :, 52:].max().item() == pytest.approx(-1.0)


def test_epoch_order_covers_every_image_once_per_pass() -> None:
    order = _EpochOrder(count=5, seed=3, salt=1, flip=True)
    seen = [int(i) for step in range(5) for i in order.batch(step, 2)[0]]  # two passes of 5
    assert sorted(seen[:5]) == [0, 1, 2, 3, 4]
    assert sorted(seen[5:]) == [0, 1, 2, 3, 4]
    assert seen[:5] != seen[5:]  # reshuffled
    again = _EpochOrder(count=5, seed=3, salt=1, flip=True)
    assert torch.equal(again.batch(3, 2)[0], order.batch(3, 2)[0])  # a pure function of (seed, step)
    flips = torch.cat([order.batch(step, 2)[1] for step in range(50)])
    assert 0.3 < flips.float().mean().item() < 0.7
    unflipped = _EpochOrder(count=5, seed=3, salt=1, flip=False)
    assert not any(bool(unflipped.batch(step, 2)[1].any()) for step in range(10))


def test_config_round_trips_and_refuses_unknown_keys() -> None:
    config = small_config(preview_prompts=["a photo of sks dog"])
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(EngineInputError, match="learnig_rate"):
        TrainConfig.from_dict({**config.to_dict(), "learnig_rate": 1.0})


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(("field", "value"), [
    ("steps", 0), ("resolution", 60), ("resolution", 0), ("method", "qlora"), ("learning_rate", -1.0),
    ("learning_rate", float("nan")), ("batch_size", 0), ("rank", 0), ("prior_loss_weight", -1.0),
    ("min_snr_gamma", 0.0), ("train_text_encoder", "yes"), ("steps", 2.5), ("checkpoint_every", -1),
    ("lora_alpha", 0), ("offset_noise", -0.1),
])
def test_validation_names_the_field(field: str, value: object) -> None:
    config = TrainConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(EngineInputError, match=field):
        config.validate()


def test_previews_need_prompts() -> None:
    with pytest.raises(EngineInputError, match="preview_prompts"):
        TrainConfig(preview_every=10).validate()


def test_bad_inputs_are_named(tiny_model: BaseModel, subject_photos: list[Path], class_images: list[Path],
                              tmp_path: Path) -> None:
    with pytest.raises(EngineInputError, match="missing.jpg"):
        run(tiny_model, small_config(), [*subject_photos, tmp_path / "missing.jpg"], class_images, tmp_path / "a")
    with pytest.raises(EngineInputError, match="class_images"):
        run(tiny_model, small_config(), subject_photos, [], tmp_path / "b")
    with pytest.raises(EngineInputError, match="instance_images"):
        run(tiny_model, small_config(), [], class_images, tmp_path / "c")
    with pytest.raises(EngineInputError, match="instance_prompt"):
        train(tiny_model, small_config(), instance_images=subject_photos, instance_prompt=" ",
              class_images=class_images, class_prompt=CLASS_PROMPT, run_dir=tmp_path / "d")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    with pytest.raises(EngineInputError, match="notes.jpg"):
        run(tiny_model, small_config(), [not_an_image], class_images, tmp_path / "e")


# ---------------------------------------------------------------------------------------------
# Learning


def test_training_learns_and_prior_preservation_keeps_the_class(
        tiny_model: BaseModel, subject_photos: list[Path], class_images: list[Path], tmp_path: Path) -> None:
    def losses(run_dir: Path | None) -> tuple[float, float]:
        unet = load_trained_pipeline(tiny_model, run_dir).unet if run_dir else None
        return (denoising_loss(tiny_model, subject_photos, INSTANCE_PROMPT, resolution=64, denoiser=unet),
                denoising_loss(tiny_model, class_images, CLASS_PROMPT, resolution=64, denoiser=unet))

    instance_before, class_before = losses(None)
    config = small_config(steps=80, learning_rate=3e-3, rank=8)
    run(tiny_model, config, subject_photos, class_images, tmp_path / "prior")
    run(tiny_model, TrainConfig(**{**config.to_dict(), "with_prior": False}), subject_photos, class_images,
        tmp_path / "no-prior")
    instance_prior, class_prior = losses(tmp_path / "prior")
    instance_alone, class_alone = losses(tmp_path / "no-prior")

    # The subject is learned, with or without the prior term.
    assert instance_prior < 0.95 * instance_before
    assert instance_alone < 0.95 * instance_before
    # The class images keep a clearly better fit when the prior term trains on them in every batch.
    # (The tiny model is random, so any training also improves generic denoising and moves both
    # losses down; the comparison between the two runs is what isolates the prior term.)
    assert class_prior < class_alone - 0.01 * class_before


def test_instance_and_class_examples_share_one_batch(tiny_model: BaseModel, subject_photos: list[Path],
                                                     class_images: list[Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    conditioning: list[torch.Tensor] = []
    original_forward = UNet2DConditionModel.forward

    def recording_forward(self: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
                          encoder_hidden_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        conditioning.append(encoder_hidden_states.detach().clone())
        return original_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)  # type: ignore

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    run(tiny_model, small_config(steps=2, batch_size=3), subject_photos, class_images, tmp_path / "run")

    text_encoder, tokenizer = tiny_model.text_encoder, tiny_model.tokenizer
    with torch.no_grad():
        embed = {prompt: text_encoder(tokenizer(prompt, padding="max_length", max_length=77,
                                                return_tensors="pt").input_ids)[0][0]
                 for prompt in (INSTANCE_PROMPT, CLASS_PROMPT)}
    assert len(conditioning) == 2
    for hidden in conditioning:
        assert hidden.shape[0] == 6  # 3 instance examples, then 3 class examples, one forward pass
        for row in hidden[:3]:
            assert torch.allclose(row, embed[INSTANCE_PROMPT], atol=1e-5)
        for row in hidden[3:]:
            assert torch.allclose(row, embed[CLASS_PROMPT], atol=1e-5)


def test_same_seed_gives_the_same_loss_curve(tiny_model: BaseModel, subject_photos: list[Path],
                                             class_images: list[Path], tmp_path: Path) -> None:
    config = small_config(steps=5, batch_size=2, offset_noise=0.05, min_snr_gamma=5.0)
    torch.manual_seed(1)  # global RNG state must not matter
    first = run(tiny_model, config, subject_photos, class_images, tmp_path / "one")
    torch.manual_seed(2)
    second = run(tiny_model, config, subject_photos, class_images, tmp_path / "two")
    other = run(tiny_model, small_config(steps=5, batch_size=2, offset_noise=0.05, min_snr_gamma=5.0, seed=7),
                subject_photos, class_images, tmp_path / "three")
    assert first.loss_history == second.loss_history
    assert len(first.loss_history) == 5
    assert other.loss_history != first.loss_history
    for key, tensor in lora_tensors(tmp_path / "one").items():
        assert torch.equal(tensor, lora_tensors(tmp_path / "two")[key])


def test_cached_and_uncached_latents_train_identically(tiny_model: BaseModel, subject_photos: list[Path],
                                                       class_images: list[Path], tmp_path: Path) -> None:
    cached = run(tiny_model, small_config(steps=3), subject_photos, class_images, tmp_path / "cached")
    uncached = run(tiny_model, small_config(steps=3, cache_latents=False), subject_photos, class_images,
                   tmp_path / "uncached")
    assert uncached.loss_history == pytest.approx(cached.loss_history, rel=1e-4)


def test_v_prediction_models_train(tiny_model: BaseModel, subject_photos: list[Path], class_images: list[Path],
                                   tmp_path: Path) -> None:
    scheduler = DDPMScheduler.from_config(tiny_model.noise_scheduler.config,
                                          prediction_type="v_prediction")
    v_model = dataclasses.replace(tiny_model, noise_scheduler=scheduler)
    epsilon = run(tiny_model, small_config(steps=2, min_snr_gamma=5.0), subject_photos, class_images,
                  tmp_path / "epsilon")
    velocity = run(v_model, small_config(steps=2, min_snr_gamma=5.0), subject_photos, class_images,
                   tmp_path / "velocity")
    assert all(np.isfinite(velocity.loss_history))
    assert velocity.loss_history != epsilon.loss_history


def test_gradient_checkpointing_does_not_change_the_math(tiny_model: BaseModel, subject_photos: list[Path],
                                                         class_images: list[Path], tmp_path: Path) -> None:
    plain = small_config(steps=3, train_text_encoder=True)
    checkpointed = small_config(steps=3, train_text_encoder=True, gradient_checkpointing=True)
    first = run(tiny_model, plain, subject_photos, class_images, tmp_path / "plain")
    second = run(tiny_model, checkpointed, subject_photos, class_images, tmp_path / "checkpointed")
    assert second.loss_history == pytest.approx(first.loss_history, rel=1e-5)
    reference = lora_tensors(tmp_path / "plain")
    for key, tensor in lora_tensors(tmp_path / "checkpointed").items():
        assert torch.allclose(tensor, reference[key], rtol=1e-4, atol=1e-7), key


def test_min_snr_with_prior_trains_at_batch_two(tiny_model: BaseModel, subject_photos: list[Path],
                                                class_images: list[Path], tmp_path: Path) -> None:
    plain = run(tiny_model, small_config(steps=2, batch_size=2), subject_photos, class_images, tmp_path / "plain")
    weighted = run(tiny_model, small_config(steps=2, batch_size=2, min_snr_gamma=5.0), subject_photos,
                   class_images, tmp_path / "snr")
    assert weighted.loss_history != plain.loss_history
    assert all(np.isfinite(weighted.loss_history))


# ---------------------------------------------------------------------------------------------
# Outputs


def test_lora_run_writes_weights_exports_and_run_record(tiny_model: BaseModel, subject_photos: list[Path],
                                                        class_images: list[Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    info = {"identifier": "sks", "base_model": tiny_model.spec, "fingerprint": tiny_model.fingerprint,
            "prior_images": len(class_images)}
    result = run(tiny_model, small_config(steps=3), subject_photos, class_images, run_dir, run_info=info)
    assert (run_dir / LORA_WEIGHTS_FILE).is_file()
    assert (run_dir / KOHYA_LORA_FILE).is_file()
    assert not (run_dir / "unet").exists()
    assert not (run_dir / "checkpoints").exists()  # finished runs keep no checkpoints
    record = json.loads((run_dir / RUN_FILE).read_text())
    assert record["config"] == small_config(steps=3).to_dict()
    assert record["run_info"] == info
    assert record["final_step"] == result.final_step == 3
    assert record["loss_history"] == result.loss_history
    assert record["timings"]["steps_per_second"] > 0
    assert record["timings"]["peak_memory_mb"] > 0
    assert record["base_model"]["fingerprint"] == tiny_model.fingerprint
    assert result.resumed_from is None
    # Only the UNet attention projections carry LoRA, and the text encoder is untouched by default.
    keys = list(lora_tensors(run_dir))
    assert keys and all(k.startswith("unet.") for k in keys)
    assert {k.split(".lora")[0].rsplit(".", 1)[-1] for k in keys} == {"to_q", "to_k", "to_v", "0"}


def test_text_encoder_lora_is_saved(tiny_model: BaseModel, subject_photos: list[Path], class_images: list[Path],
                                    tmp_path: Path) -> None:
    run(tiny_model, small_config(steps=2, train_text_encoder=True, text_encoder_lr=5e-4), subject_photos,
        class_images, tmp_path / "run")
    keys = list(lora_tensors(tmp_path / "run"))
    assert any(k.startswith("text_encoder.") and "q_proj" in k for k in keys)
    assert any(k.startswith("unet.") for k in keys)


def test_full_fine_tune_saves_only_what_was_trained(tiny_model: BaseModel, subject_photos: list[Path],
                                                    class_images: list[Path], tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in tiny_model.unet.state_dict().items()}
    unet_only = tmp_path / "unet-only"
    run(tiny_model, small_config(method="full", steps=2, learning_rate=1e-4), subject_photos, class_images,
        unet_only)
    assert (unet_only / "unet" / "config.json").is_file()
    assert not (unet_only / "text_encoder").exists()
    assert not (unet_only / LORA_WEIGHTS_FILE).exists()

    both = tmp_path / "both"
    run(tiny_model, small_config(method="full", steps=2, learning_rate=1e-4, train_text_encoder=True),
        subject_photos, class_images, both)
    assert (both / "unet" / "config.json").is_file()
    assert (both / "text_encoder" / "config.json").is_file()
    # The shared base model is never modified.
    for key, value in tiny_model.unet.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_previews_and_checkpoint_events(tiny_model: BaseModel, subject_photos: list[Path],
                                        class_images: list[Path], tmp_path: Path) -> None:
    events: list[Progress] = []
    run_dir = tmp_path / "run"

    def record(event: Progress) -> None:
        events.append(event)
        if event.checkpoint is not None:
            assert (event.checkpoint / CHECKPOINT_MARKER).is_file()
            assert len(list((run_dir / "checkpoints").glob("step-*"))) <= 2

    config = small_config(steps=6, checkpoint_every=2, preview_every=3, preview_prompts=["a photo of sks dog",
                                                                                          "a sks dog on the beach"],
                          preview_steps=2)
    run(tiny_model, config, subject_photos, class_images, run_dir, progress=record)
    assert [e.checkpoint.name for e in events if e.checkpoint] == ["step-2", "step-4", "step-6"]
    preview_events = [e for e in events if e.previews]
    assert [e.step for e in preview_events] == [3, 6]
    assert [p.name for p in preview_events[0].previews] == ["step-3-0.png", "step-3-1.png"]
    with Image.open(preview_events[1].previews[1]) as image:
        assert image.size == (64, 64)
    assert all(e.stage == "training" for e in events)
    assert events[-1].step == events[-1].total == 6


# ---------------------------------------------------------------------------------------------
# Checkpoints, resume, cancel, divergence


def test_resume_matches_an_uninterrupted_run(tiny_model: BaseModel, subject_photos: list[Path],
                                             class_images: list[Path], tmp_path: Path) -> None:
    config = small_config(steps=6, checkpoint_every=3, learning_rate=5e-3, lr_warmup_steps=4)
    straight = run(tiny_model, config, subject_photos, class_images, tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    calls = 0

    def stop_before_step_five() -> bool:
        nonlocal calls
        calls += 1
        return calls == 5

    with pytest.raises(Cancelled):
        run(tiny_model, config, subject_photos, class_images, interrupted, should_cancel=stop_before_step_five)
    assert latest_checkpoint(interrupted) == interrupted / "checkpoints" / "step-3"
    assert not (interrupted / LORA_WEIGHTS_FILE).exists()

    resumed = run(tiny_model, config, subject_photos, class_images, interrupted)
    assert resumed.resumed_from == 3
    assert resumed.final_step == 6
    assert resumed.loss_history == pytest.approx(straight.loss_history, rel=1e-5, abs=1e-7)
    reference = lora_tensors(tmp_path / "straight")
    for key, tensor in lora_tensors(interrupted).items():
        assert torch.allclose(tensor, reference[key], rtol=1e-5, atol=1e-7), key


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    tiny_model: BaseModel, subject_photos: list[Path], class_images: list[Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.engine import train as train_module

    real_save_file = train_module.save_file
    saves = 0

    def save_until_the_disk_fills(*args: object, **kwargs: object) -> None:
        nonlocal saves
        saves += 1
        if saves == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save_file(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "save_file", save_until_the_disk_fills)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        run(tiny_model, small_config(steps=4, checkpoint_every=2), subject_photos, class_images, run_dir)
    # The half-written checkpoint is gone; the one before it is whole, and the run resumes from it.
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["step-2"]
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-2"
    monkeypatch.setattr(train_module, "save_file", real_save_file)
    resumed = run(tiny_model, small_config(steps=4, checkpoint_every=2), subject_photos, class_images, run_dir)
    assert resumed.resumed_from == 2 and resumed.final_step == 4


def test_incomplete_checkpoints_are_ignored_and_removed(tiny_model: BaseModel, subject_photos: list[Path],
                                                        class_images: list[Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    unfinished = run_dir / "checkpoints" / ".tmp-3"
    unfinished.mkdir(parents=True)
    (unfinished / "trainable.safetensors").write_bytes(b"half written")
    unmarked = run_dir / "checkpoints" / "step-2"
    unmarked.mkdir()
    result = run(tiny_model, small_config(steps=2), subject_photos, class_images, run_dir)
    assert result.resumed_from is None
    assert len(result.loss_history) == 2
    assert not unfinished.exists()


def test_resume_refuses_a_checkpoint_from_other_settings(tiny_model: BaseModel, subject_photos: list[Path],
                                                         class_images: list[Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Cancelled):
        run(tiny_model, small_config(steps=4, checkpoint_every=2), subject_photos, class_images, run_dir,
            should_cancel=iter([False, False, True]).__next__)
    with pytest.raises(EngineInputError, match="learning_rate"):
        run(tiny_model, small_config(steps=4, checkpoint_every=2, learning_rate=1e-2), subject_photos,
            class_images, run_dir)


def test_a_finished_run_is_not_trained_again(tiny_model: BaseModel, subject_photos: list[Path],
                                             class_images: list[Path], tmp_path: Path) -> None:
    first = run(tiny_model, small_config(steps=2), subject_photos, class_images, tmp_path / "run")

    def must_not_train() -> bool:
        raise AssertionError("a finished run was trained again")

    again = run(tiny_model, small_config(steps=2), subject_photos, class_images, tmp_path / "run",
                should_cancel=must_not_train)
    assert again.loss_history == first.loss_history

    # With its weights gone, the run is trained again.
    (tmp_path / "run" / LORA_WEIGHTS_FILE).unlink()
    checks: list[bool] = []

    def count_steps() -> bool:
        checks.append(True)
        return False

    retrained = run(tiny_model, small_config(steps=2), subject_photos, class_images, tmp_path / "run",
                    should_cancel=count_steps)
    assert len(checks) == 2
    assert retrained.loss_history == first.loss_history
    assert (tmp_path / "run" / LORA_WEIGHTS_FILE).is_file()


def test_cancel_stops_at_the_next_step(tiny_model: BaseModel, subject_photos: list[Path],
                                       class_images: list[Path], tmp_path: Path) -> None:
    calls = 0

    def cancel_on_third_check() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    with pytest.raises(Cancelled):
        run(tiny_model, small_config(steps=50), subject_photos, class_images, tmp_path / "run",
            should_cancel=cancel_on_third_check)
    assert calls == 3
    assert not (tmp_path / "run" / LORA_WEIGHTS_FILE).exists()
    assert not (tmp_path / "run" / RUN_FILE).exists()


def test_non_finite_loss_stops_the_run_and_saves_nothing(tiny_model: BaseModel, subject_photos: list[Path],
                                                         class_images: list[Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+ \(loss (nan|inf)"):
        run(tiny_model, small_config(steps=20, learning_rate=1e30), subject_photos, class_images, run_dir)
    assert not (run_dir / LORA_WEIGHTS_FILE).exists()
    assert not (run_dir / KOHYA_LORA_FILE).exists()
    assert not (run_dir / RUN_FILE).exists()


def test_non_finite_weights_are_never_checkpointed(tiny_model: BaseModel, subject_photos: list[Path],
                                                   class_images: list[Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    original_step = torch.optim.AdamW.step

    def poisoned_step(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        result = original_step(self, *args, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="not finite"):
        run(tiny_model, small_config(steps=1, checkpoint_every=1), subject_photos, class_images, run_dir)
    assert latest_checkpoint(run_dir) is None
    checkpoints = run_dir / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    assert not (run_dir / LORA_WEIGHTS_FILE).exists()
