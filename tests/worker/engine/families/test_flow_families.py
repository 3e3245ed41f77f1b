"""FLUX.2 klein and Z-Image on their tiny built-ins, on the CPU: the family contract against the stock
diffusers pipelines, training (LoRA with prior preservation), exports, resume and reproducibility,
and a whole job from four photos.

One LoRA run per family (module-scoped) serves the tests that inspect a trained run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.worker.engine.conftest import make_subject_photo
from worker.engine.errors import Cancelled
from worker.engine.families.base import ImageMeta
from worker.engine.families.qwen import COMFY_LORA_FILE, comfy_lora_deltas
from worker.engine.job import JobSpec, run_job
from worker.engine.models import BaseModel, build_builtin
from worker.engine.priors import fill_prior_bank
from worker.engine.train import (
    TrainConfig,
    TrainResult,
    denoising_loss,
    latest_checkpoint,
    prediction_drift,
    train,
)
from worker.engine.weights import LORA_WEIGHTS_FILE, load_trained_pipeline, lora_deltas_from_diffusers

FAMILIES = ["tiny-flux2", "tiny-zimage"]
INSTANCE_PROMPT = "a photo of xip dog"
CLASS_PROMPT = "a photo of dog"


@dataclass
class Trained:
    model: BaseModel
    photos: list[Path]
    classes: list[Path]
    run_dir: Path
    result: TrainResult
    instance_before: float


def make_class_image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 255, size=3)
    pixels[::8] = rng.integers(0, 255, size=3)
    Image.fromarray(pixels).save(path)
    return path


def images(folder: Path) -> tuple[list[Path], list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    photos = [make_subject_photo(folder / f"photo{i}.jpg", seed=i) for i in range(4)]
    classes = [make_class_image(folder / f"class{i}.png", seed=50 + i) for i in range(4)]
    return photos, classes


def config(**changes: Any) -> TrainConfig:
    values: dict[str, Any] = {"steps": 4, "resolution": 64, "rank": 8, "learning_rate": 1e-2, "min_snr_gamma": None}
    values.update(changes)
    return TrainConfig(**values)


def run(model: BaseModel, settings: TrainConfig, photos: list[Path], classes: list[Path], run_dir: Path,
        **kwargs: Any) -> TrainResult:
    return train(model, settings, instance_images=photos, instance_prompt=INSTANCE_PROMPT, class_images=classes,
                 class_prompt=CLASS_PROMPT, run_dir=run_dir, **kwargs)


def render(model: BaseModel, pipe: Any, prompt: str = INSTANCE_PROMPT, steps: int = 2) -> np.ndarray:
    return model.family.render(pipe, [prompt], negative_prompt="", steps=steps, guidance=model.family.sample_guidance,
                               resolution=64, generators=[torch.Generator().manual_seed(0)])


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One CPU thread: the tiny models' matrices are small, and on a shared 2-core machine two
    threads waiting for each other make every step tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> BaseModel:
    return build_builtin(request.param, seed=0, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def trained(model: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A LoRA run with classic prior preservation (a bank of the base model's samples): 24 steps at rank 8."""
    root = tmp_path_factory.mktemp(model.spec)
    photos, _ = images(root / "images")
    # The class images are what a job trains with: the base model's own samples of the class prompt.
    classes = fill_prior_bank(model, root / "bank", CLASS_PROMPT, 4, resolution=64, steps=2).images
    before = denoising_loss(model, photos, INSTANCE_PROMPT, resolution=64)
    result = run(model, config(steps=24), photos, classes, root / "run")
    return Trained(model, photos, classes, root / "run", result, before)


# ---------------------------------------------------------------------------------------------
# The family against its stock pipeline


def test_the_stock_pipeline_samples_with_the_family_defaults(model: BaseModel) -> None:
    pipe = model.pipeline()
    assert type(pipe).__name__ == model.family.pipeline_class_name
    pixels = render(model, pipe, steps=model.family.sample_steps)
    assert pixels.shape == (1, 64, 64, 3) and np.isfinite(pixels).all()
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0 and pixels.std() > 0.0


def test_prompts_are_encoded_as_the_pipeline_encodes_them(model: BaseModel) -> None:
    pipe = model.pipeline()
    ours = model.family.encode_prompts(model, model.modules, [INSTANCE_PROMPT])
    if model.family.name == "flux2":
        theirs, _ = pipe.encode_prompt(INSTANCE_PROMPT, device=torch.device("cpu"))
        assert torch.allclose(ours["encoder_hidden_states"], theirs)
    else:
        theirs, _ = pipe.encode_prompt(INSTANCE_PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False)
        mask = ours["attention_mask"][0] > 0.5
        assert torch.allclose(ours["encoder_hidden_states"][0][mask], theirs[0])


def test_predict_is_the_velocity_the_pipeline_integrates(model: BaseModel) -> None:
    """One Euler step of the stock pipeline from σ = 1 to 0 is x − v with the family's v at σ = 1."""
    family = model.family
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        shape = family.to_latents(model, torch.zeros(1, model.vae.config.latent_channels, 8, 8)).shape
        start = torch.randn(shape, generator=generator)
        conditioning = family.encode_prompts(model, model.modules, [INSTANCE_PROMPT])
        noised = family.objective(model, torch.device("cpu"), min_snr_gamma=None, offset_noise=0.0).at_fraction(
            torch.zeros(shape), start, 1.0)
        velocity = family.predict(model, model.denoiser, noised, conditioning, ImageMeta(torch.zeros(1, 4)))
        out = model.pipeline()(prompt=INSTANCE_PROMPT, latents=start.clone(), num_inference_steps=1, height=64,
                               width=64, guidance_scale=family.sample_guidance, output_type="latent").images
        if family.name == "flux2":  # the pipeline hands back the VAE's own latent layout
            out = family.to_latents(model, out)
    assert torch.allclose(out, start - velocity, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Training, the saved LoRA and its exports


def test_lora_with_prior_preservation_learns_the_subject(trained: Trained) -> None:
    model = trained.model
    history = trained.result.loss_history
    assert len(history) == 24 and all(np.isfinite(history))
    pipe = load_trained_pipeline(model, trained.run_dir)
    after = denoising_loss(model, trained.photos, INSTANCE_PROMPT, resolution=64, denoiser=pipe.transformer)
    assert after < 0.9 * trained.instance_before
    record = json.loads((trained.run_dir / "run.json").read_text())
    assert record["base_model"]["family"] == model.family.name
    assert record["outputs"] == [LORA_WEIGHTS_FILE, COMFY_LORA_FILE]


def test_both_kinds_of_prior_preservation_hold_the_class(trained: Trained, tmp_path: Path) -> None:
    """Against the same run without preservation (same seed, same steps): classic preservation keeps
    the base model's class samples better fitted, bank-free preservation keeps the class prompt's
    predictions closer to the base model's."""
    model = trained.model
    settings = config(steps=24)
    run(model, TrainConfig(**{**settings.to_dict(), "prior_source": "base_model"}), trained.photos, [],
        tmp_path / "base_model")
    run(model, TrainConfig(**{**settings.to_dict(), "with_prior": False}), trained.photos, [], tmp_path / "none")
    runs = {"bank": trained.run_dir, "base_model": tmp_path / "base_model", "none": tmp_path / "none"}
    denoisers = {name: load_trained_pipeline(model, folder).transformer for name, folder in runs.items()}
    for name, denoiser in denoisers.items():
        after = denoising_loss(model, trained.photos, INSTANCE_PROMPT, resolution=64, denoiser=denoiser)
        assert after < 0.95 * trained.instance_before, name  # the subject is learned in every mode
    class_fit = {name: denoising_loss(model, trained.classes, CLASS_PROMPT, resolution=64, denoiser=denoisers[name])
                 for name in ("bank", "none")}
    assert class_fit["bank"] < class_fit["none"]
    drift = {name: prediction_drift(model, trained.classes, CLASS_PROMPT, resolution=64, denoiser=denoisers[name])
             for name in ("base_model", "none")}
    assert drift["base_model"] < 0.8 * drift["none"]


def test_the_stock_pipeline_loads_the_lora_and_it_changes_the_output(trained: Trained) -> None:
    model = trained.model
    stock = model.family.pipeline_class()(**model.pipeline().components)  # a plain stock pipeline
    before = render(model, stock)
    stock.load_lora_weights(str(trained.run_dir))
    with_lora = render(model, stock)
    fused = render(model, load_trained_pipeline(model, trained.run_dir))
    assert np.abs(with_lora - before).max() > 0.01
    assert np.abs(with_lora - fused).max() < 1e-4
    keys = load_file(str(trained.run_dir / LORA_WEIGHTS_FILE))
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)


def test_the_comfyui_export_holds_the_same_weight_changes(trained: Trained) -> None:
    from worker.engine.families import flux2, zimage

    native = flux2.native_name if trained.model.family.name == "flux2" else zimage.native_name
    exported = comfy_lora_deltas(trained.run_dir / COMFY_LORA_FILE)
    expected: dict[str, dict[int, torch.Tensor]] = {}
    for module, delta in lora_deltas_from_diffusers(trained.run_dir).items():
        target = native(module.removeprefix("transformer."))
        assert target is not None, module
        expected.setdefault(target[0], {})[target[1]] = delta
    assert set(exported) == set(expected)
    for name, parts in expected.items():
        assert torch.allclose(exported[name], torch.cat([parts[i] for i in sorted(parts)]), atol=1e-6), name
    # Fused projections are exported fused, under the original checkpoint's names.
    fused = "double_blocks.0.img_attn.qkv" if trained.model.family.name == "flux2" else "layers.0.attention.qkv"
    assert fused in exported


def test_the_flux2_comfyui_export_loads_in_diffusers_to_the_same_image(trained: Trained) -> None:
    """diffusers reads FLUX.2 LoRAs in the original (BFL / ComfyUI) layout too: the export round-trips."""
    model = trained.model
    if model.family.name != "flux2":
        pytest.skip("diffusers reads Z-Image's fused-qkv layout only in the kohya spelling")
    from_export = model.pipeline()
    from_export.load_lora_weights(str(trained.run_dir / COMFY_LORA_FILE))
    from_diffusers = model.pipeline()
    from_diffusers.load_lora_weights(str(trained.run_dir))
    assert np.abs(render(model, from_export) - render(model, from_diffusers)).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# Reproducibility


def test_same_seed_same_curve_and_resume_equals_an_uninterrupted_run(model: BaseModel, tmp_path: Path) -> None:
    photos, classes = images(tmp_path / "images")
    settings = config(steps=4, checkpoint_every=2, lr_warmup_steps=2)
    straight = run(model, settings, photos, classes, tmp_path / "straight")
    again = run(model, settings, photos, classes, tmp_path / "again")
    assert again.loss_history == straight.loss_history

    calls = 0

    def stop_before_step_three() -> bool:
        nonlocal calls
        calls += 1
        return calls == 3

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Cancelled):
        run(model, settings, photos, classes, interrupted, should_cancel=stop_before_step_three)
    assert latest_checkpoint(interrupted) == interrupted / "checkpoints" / "step-2"
    resumed = run(model, settings, photos, classes, interrupted)
    assert resumed.resumed_from == 2
    assert resumed.loss_history == pytest.approx(straight.loss_history, rel=1e-5, abs=1e-7)
    reference = load_file(str(tmp_path / "straight" / LORA_WEIGHTS_FILE))
    for key, tensor in load_file(str(interrupted / LORA_WEIGHTS_FILE)).items():
        assert torch.allclose(tensor, reference[key], rtol=1e-5, atol=1e-7), key


def test_memory_options_do_not_change_the_math(model: BaseModel, tmp_path: Path) -> None:
    """Gradient checkpointing of the transformer and uncached latents give the plain run's loss curve."""
    photos, classes = images(tmp_path / "images")
    plain = run(model, config(steps=2), photos, classes, tmp_path / "plain").loss_history
    lighter = run(model, config(steps=2, gradient_checkpointing=True, cache_latents=False), photos, classes,
                  tmp_path / "lighter").loss_history
    assert lighter == pytest.approx(plain, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The job


def test_a_job_from_four_photos(model: BaseModel, tmp_path: Path) -> None:
    photos, _ = images(tmp_path / "images")
    spec = JobSpec(photos=photos, class_noun="dog", subject_kind="pet", work_dir=tmp_path / "job",
                   bank_root=tmp_path / "bank", quality="fast", prior_images=2, prompts=["{subject} on the beach"],
                   images_per_prompt=1, sample_steps=2, prior_steps=2, batch_size=2, resolution=64,
                   train_overrides={"steps": 2, "rank": 4, "checkpoint_every": 0, "preview_every": 0})
    result = run_job(spec, model)
    assert result.train.final_step == 2 and (result.prior_generated, result.prior_reused) == (2, 0)
    assert result.instance_prompt == f"a photo of {result.identifier} dog"
    assert (result.run_dir / LORA_WEIGHTS_FILE).is_file() and (result.run_dir / COMFY_LORA_FILE).is_file()
    assert len(result.images) == 1
    with Image.open(result.images[0].path) as image:
        assert image.size == (64, 64)
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["config"]["min_snr_gamma"] is None and record["config"]["train_text_encoder"] is False
