"""The family contract on the UNet families' tiny built-ins (SD 1.x: ``tiny``, SDXL: ``tiny-sdxl``).

The same tests run on every family: the trained LoRA loads in the family's stock diffusers
pipeline, its kohya file reads the same through diffusers' own converter, the subject is learned
while both kinds of prior preservation hold the class, resume and seeds are exact, and a whole job
runs from 4 photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from safetensors.torch import load_file

from tests.worker.engine.conftest import make_subject_photo
from tests.worker.engine.test_train import make_class_image
from worker.engine.errors import Cancelled
from worker.engine.job import JobSpec, run_job
from worker.engine.models import BaseModel, build_builtin
from worker.engine.priors import fill_prior_bank
from worker.engine.train import TrainConfig, TrainResult, denoising_loss, prediction_drift, train
from worker.engine.weights import KOHYA_LORA_FILE, LORA_WEIGHTS_FILE, load_trained_pipeline

CPU = torch.device("cpu")
INSTANCE_PROMPT = "a photo of xqz dog"
CLASS_PROMPT = "a photo of a dog"
UNET_FAMILIES = ["tiny", "tiny-sdxl"]


def fresh(spec: str) -> BaseModel:
    """A newly built copy of a built-in: nothing shared with the model the tests train."""
    return build_builtin(spec, seed=0, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module", params=UNET_FAMILIES)
def model(request: pytest.FixtureRequest) -> BaseModel:
    return fresh(request.param)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    # Landscape and portrait photos: their crops differ, which SDXL is conditioned on.
    sizes = [(160, 120), (120, 160), (200, 120), (128, 128)]
    return [make_subject_photo(folder / f"photo{i}.jpg", seed=i, size=size) for i, size in enumerate(sizes)]


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("classes")
    return [make_class_image(folder / f"class{i}.png", seed=50 + i) for i in range(4)]


def config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {"steps": 4, "resolution": 64, "rank": 4, "learning_rate": 1e-3}
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def run(model: BaseModel, settings: TrainConfig, photos: list[Path], classes: list[Path], run_dir: Path,
        **kwargs: object) -> TrainResult:
    return train(model, settings, instance_images=photos, instance_prompt=INSTANCE_PROMPT, class_images=classes,
                 class_prompt=CLASS_PROMPT, run_dir=run_dir, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lora_run(model: BaseModel, photos: list[Path], classes: list[Path],
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on the denoiser and every text encoder, with alpha ≠ rank."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    run(model, config(steps=15, learning_rate=1e-2, train_text_encoder=True, lora_alpha=8), photos, classes, run_dir)
    return run_dir


def sample(pipe: object) -> np.ndarray:
    generator = torch.Generator().manual_seed(3)
    runner: object = pipe
    images = runner(INSTANCE_PROMPT, num_inference_steps=4, generator=generator, height=64,  # type: ignore[operator]
                    width=64, output_type="np").images
    return np.asarray(images[0])


# ---------------------------------------------------------------------------------------------
# Exports


def test_the_lora_loads_in_the_stock_pipeline_and_changes_its_output(model: BaseModel, lora_run: Path) -> None:
    stock = fresh(model.spec).pipeline()
    assert type(stock).__name__ == model.family.pipeline_class_name
    before = sample(stock)
    stock.load_lora_weights(str(lora_run))  # diffusers' own loader, the file unchanged
    after = sample(stock)
    assert np.abs(after - before).max() > 1e-2
    # Our fused loader gives the picture stock diffusers gives.
    ours = sample(load_trained_pipeline(model, lora_run))
    assert np.abs(ours - after).max() < 1e-3


def test_the_lora_covers_the_denoiser_and_every_text_encoder(model: BaseModel, lora_run: Path) -> None:
    components = {key.split(".", 1)[0] for key in load_file(str(lora_run / LORA_WEIGHTS_FILE))}
    assert components == {model.family.denoiser_key, *model.family.text_encoder_keys}
    kohya = {key.split(".", 1)[0] for key in load_file(str(lora_run / KOHYA_LORA_FILE))}
    for prefix in model.family.kohya_prefixes.values():
        assert any(name.startswith(prefix) for name in kohya), prefix


def test_the_kohya_file_gives_the_same_picture_through_diffusers_converter(model: BaseModel,
                                                                            lora_run: Path) -> None:
    # diffusers converts kohya (A1111, ComfyUI) files itself: a third-party reader of our export.
    original = fresh(model.spec).pipeline()
    original.load_lora_weights(str(lora_run))
    converted = fresh(model.spec).pipeline()
    converted.load_lora_weights(str(lora_run), weight_name=KOHYA_LORA_FILE)
    assert np.abs(sample(converted) - sample(original)).max() < 1e-3


# ---------------------------------------------------------------------------------------------
# Learning


def test_the_subject_is_learned_and_both_kinds_of_prior_preservation_hold_the_class(
        model: BaseModel, photos: list[Path], tmp_path: Path) -> None:
    # The class images are what a job trains with: the base model's own samples of the class prompt.
    bank = fill_prior_bank(model, tmp_path / "bank", CLASS_PROMPT, 4, resolution=64, steps=4).images

    def trained(run_dir: Path) -> torch.nn.Module:
        return getattr(load_trained_pipeline(model, run_dir), model.family.denoiser_key)  # type: ignore[no-any-return]

    # tiny-sdxl's UNet, like SDXL's, has no attention at its first level, so its LoRA has less to
    # work with: a higher rate, and a 5 % fall is a clear one for both.
    settings = config(steps=40, learning_rate=4e-3 if model.family.name == "sd" else 6e-3, rank=8)
    runs = {
        "bank": settings,
        "base_model": TrainConfig(**{**settings.to_dict(), "prior_source": "base_model"}),
        "none": TrainConfig(**{**settings.to_dict(), "with_prior": False}),
    }
    for name, settings_of_run in runs.items():
        run(model, settings_of_run, photos, bank if name == "bank" else [], tmp_path / name)
    before = denoising_loss(model, photos, INSTANCE_PROMPT, resolution=64)
    for name in runs:
        after = denoising_loss(model, photos, INSTANCE_PROMPT, resolution=64, denoiser=trained(tmp_path / name))
        assert after < 0.95 * before, name  # the subject is learned in every mode
    # Classic preservation trains on the class images in every batch: the base model's samples of
    # the class keep a better fit than without it. (The tiny model is random, so any training also
    # improves generic denoising; the comparison between runs isolates the prior term.)
    class_fit = {name: denoising_loss(model, bank, CLASS_PROMPT, resolution=64, denoiser=trained(tmp_path / name))
                 for name in ("bank", "none")}
    assert class_fit["bank"] < class_fit["none"]
    # Bank-free preservation holds the class prompt's predictions to the base model's own.
    drift = {name: prediction_drift(model, bank, CLASS_PROMPT, resolution=64, denoiser=trained(tmp_path / name))
             for name in ("base_model", "none")}
    assert drift["base_model"] < 0.8 * drift["none"]


def test_the_same_seed_gives_the_same_loss_curve(model: BaseModel, photos: list[Path], classes: list[Path],
                                                 tmp_path: Path) -> None:
    settings = config(steps=4, batch_size=2, min_snr_gamma=5.0, offset_noise=0.05)
    first = run(model, settings, photos, classes, tmp_path / "one")
    second = run(model, settings, photos, classes, tmp_path / "two")
    other = run(model, config(steps=4, batch_size=2, min_snr_gamma=5.0, offset_noise=0.05, seed=9), photos,
                classes, tmp_path / "three")
    assert first.loss_history == second.loss_history
    assert other.loss_history != first.loss_history


@pytest.mark.parametrize("prior_source", ["bank", "base_model"])
def test_resume_equals_an_uninterrupted_run(model: BaseModel, photos: list[Path], classes: list[Path],
                                            tmp_path: Path, prior_source: str) -> None:
    settings = config(steps=6, checkpoint_every=3, prior_source=prior_source)
    whole = run(model, settings, photos, classes, tmp_path / "whole")
    steps_seen = []

    def stop_after_four() -> bool:
        steps_seen.append(1)
        return len(steps_seen) > 4

    with pytest.raises(Cancelled):
        run(model, settings, photos, classes, tmp_path / "resumed", should_cancel=stop_after_four)
    resumed = run(model, settings, photos, classes, tmp_path / "resumed")
    assert resumed.resumed_from == 3
    assert resumed.loss_history == whole.loss_history
    for key, tensor in load_file(str(tmp_path / "whole" / LORA_WEIGHTS_FILE)).items():
        assert torch.equal(tensor, load_file(str(tmp_path / "resumed" / LORA_WEIGHTS_FILE))[key]), key


def test_sdxl_is_conditioned_on_each_photos_real_size_and_crop(photos: list[Path], classes: list[Path],
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fresh("tiny-sdxl")
    seen: list[torch.Tensor] = []
    original_forward = UNet2DConditionModel.forward

    def recording_forward(self: UNet2DConditionModel, *args: object, **kwargs: object) -> object:
        added = kwargs.get("added_cond_kwargs")
        assert isinstance(added, dict)
        seen.append(added["time_ids"].detach().clone())
        return original_forward(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    run(model, config(steps=8, batch_size=2, random_flip=True), photos, classes, tmp_path / "run")
    rows = {tuple(int(v) for v in row) for ids in seen for row in ids[:2]}  # the instance half of each batch
    # (original height, original width, crop top, crop left, target height, target width): a 160 x 120
    # photo is resized to 85 x 64 and centre-cropped at x = 10 (its mirror image at x = 11).
    expected_plain = {(120, 160, 0, 10, 64, 64), (160, 120, 10, 0, 64, 64), (120, 200, 0, 21, 64, 64),
                      (128, 128, 0, 0, 64, 64)}
    expected_mirrored = {(120, 160, 0, 11, 64, 64), (160, 120, 10, 0, 64, 64), (120, 200, 0, 22, 64, 64),
                         (128, 128, 0, 0, 64, 64)}
    assert rows <= expected_plain | expected_mirrored
    assert rows & (expected_mirrored - expected_plain)  # flipped photos carry their mirrored crop
    assert len(rows) >= 4


# ---------------------------------------------------------------------------------------------
# The whole job


def test_a_job_runs_end_to_end_from_four_photos(model: BaseModel, photos: list[Path], tmp_path: Path) -> None:
    spec = JobSpec(photos=photos, class_noun="dog", subject_kind="pet", work_dir=tmp_path / "work",
                   bank_root=tmp_path / "bank", prior_images=4, prior_steps=2, sample_steps=2, images_per_prompt=1,
                   prompts=["{subject} on the beach", "{subject} in the snow"],
                   train_overrides={"steps": 4, "rank": 4, "checkpoint_every": 2})
    result = run_job(spec, model)
    assert result.prior_generated == 4
    assert len(result.images) == 2 and all(record.path.is_file() for record in result.images)
    assert len(result.scores) == 2 and sorted(result.ranking) == [0, 1]
    assert (result.run_dir / LORA_WEIGHTS_FILE).is_file()
    assert result.train.final_step == 4
    assert all(result.identifier + " dog" in record.prompt for record in result.images)


def test_sdxl_decodes_in_full_precision_under_half_precision_autocast() -> None:
    # On a GPU without bf16 the sampler runs under fp16 autocast, where the stock SDXL VAE overflows:
    # the family then decodes the latents itself, outside autocast. Same picture as the pipeline's own decode.
    model = fresh("tiny-sdxl")
    pipe = model.pipeline()
    settings = {"negative_prompt": "", "steps": 3, "guidance": 5.0, "resolution": 64}
    plain = model.family.render(pipe, [INSTANCE_PROMPT], generators=[torch.Generator().manual_seed(1)], **settings)
    upcast = model.family.render(pipe, [INSTANCE_PROMPT], generators=[torch.Generator().manual_seed(1)],
                                 autocast_dtype=torch.float16, **settings)
    assert upcast.shape == plain.shape == (1, 64, 64, 3)
    assert np.abs(upcast - plain).max() < 1e-4


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bank_free_preservation_trains_with_trained_text_encoders_and_full_fine_tunes(
        model: BaseModel, photos: list[Path], tmp_path: Path, method: str) -> None:
    # The base model's targets come from the frozen base encoders and denoiser, whatever is trained.
    before = {key: value.clone() for key, value in model.denoiser.state_dict().items()}
    result = run(model, config(steps=2, method=method, learning_rate=1e-5 if method == "full" else 1e-3,
                               train_text_encoder=True, prior_source="base_model"), photos, [], tmp_path / "run")
    assert len(result.loss_history) == 2 and all(np.isfinite(result.loss_history))
    for key, value in model.denoiser.state_dict().items():
        assert torch.equal(value, before[key]), key  # the shared base model is never changed
