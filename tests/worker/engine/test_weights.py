"""Trained weights: stock diffusers loading, the fused loader, and the kohya export."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from safetensors.torch import load_file

from tests.worker.engine.conftest import make_subject_photo
from tests.worker.engine.test_train import make_class_image
from worker.engine.errors import EngineInputError
from worker.engine.models import BaseModel, build_builtin
from worker.engine.train import TrainConfig, train
from worker.engine.weights import (
    KOHYA_LORA_FILE,
    LORA_WEIGHTS_FILE,
    export_kohya_lora,
    load_trained_pipeline,
    lora_deltas_from_diffusers,
    lora_deltas_from_kohya,
)

PROMPT = "a photo of sks dog"


def _train(model: BaseModel, folder: Path, **settings: object) -> Path:
    photos = [make_subject_photo(folder / f"photo{i}.jpg", seed=i) for i in range(3)]
    classes = [make_class_image(folder / f"class{i}.png", seed=60 + i) for i in range(3)]
    values: dict[str, object] = {"steps": 15, "resolution": 64, "rank": 4, "learning_rate": 1e-2}
    values.update(settings)
    run_dir = folder / "run"
    train(model, TrainConfig(**values), instance_images=photos, instance_prompt=PROMPT,  # type: ignore[arg-type]
          class_images=classes, class_prompt="a photo of dog", run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tiny_model: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UNet-only LoRA run."""
    return _train(tiny_model, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def lora_te_run(tiny_model: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run on the UNet and text encoder whose alpha differs from its rank."""
    return _train(tiny_model, tmp_path_factory.mktemp("lora-te"), train_text_encoder=True, lora_alpha=8)


def fresh_pipeline() -> StableDiffusionPipeline:
    """A pipeline over freshly built tiny components: nothing shared with the training model."""
    return build_builtin("tiny", seed=0, device=torch.device("cpu"), dtype=torch.float32).pipeline()


def sample(pipe: StableDiffusionPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(3)
    images = pipe(PROMPT, num_inference_steps=4, generator=generator, height=64, width=64, output_type="np").images
    return np.asarray(images[0])


def test_lora_loads_into_stock_diffusers_and_changes_the_image(lora_run: Path) -> None:
    pipe = fresh_pipeline()
    before = sample(pipe)
    pipe.load_lora_weights(str(lora_run))
    after = sample(pipe)
    assert np.abs(after - before).mean() > 1e-3


def test_fused_loader_matches_stock_loading(tiny_model: BaseModel, lora_run: Path) -> None:
    stock = fresh_pipeline()
    stock.load_lora_weights(str(lora_run))
    ours = load_trained_pipeline(tiny_model, lora_run)
    assert np.abs(sample(ours) - sample(stock)).max() < 1e-3
    # The base model's UNet stays without adapters; the untrained text encoder is the base one.
    assert not any("lora" in name for name, _ in tiny_model.unet.named_parameters())
    assert ours.text_encoder is tiny_model.text_encoder


def test_lora_alpha_and_text_encoder_load_like_stock_diffusers(tiny_model: BaseModel, lora_te_run: Path) -> None:
    # Stock diffusers takes alpha (8, at rank 4) from the file's metadata; our fused loader must
    # scale both the UNet and the text-encoder layers the same way.
    stock = fresh_pipeline()
    stock.load_lora_weights(str(lora_te_run))
    ours = load_trained_pipeline(tiny_model, lora_te_run)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    ids = tiny_model.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ours.unet(x, 500, hidden).sample, stock.unet(x, 500, hidden).sample, atol=1e-5)
        assert torch.allclose(ours.text_encoder(ids)[0], stock.text_encoder(ids)[0], atol=1e-5)
        assert not torch.allclose(ours.unet(x, 500, hidden).sample, tiny_model.unet(x, 500, hidden).sample,
                                  atol=1e-4)
    assert np.abs(sample(ours) - sample(stock)).max() < 1e-3


def test_text_encoder_lora_changes_the_text_encoder(tiny_model: BaseModel, lora_te_run: Path) -> None:
    ours = load_trained_pipeline(tiny_model, lora_te_run)
    ids = tiny_model.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        trained = ours.text_encoder(ids)[0]
        base = tiny_model.text_encoder(ids)[0]
    assert not torch.allclose(trained, base, atol=1e-4)


def test_kohya_export_names_and_shapes(lora_te_run: Path) -> None:
    exported = load_file(str(lora_te_run / KOHYA_LORA_FILE))
    first = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert exported[f"{first}.lora_down.weight"].shape == (4, 32)
    assert exported[f"{first}.lora_up.weight"].shape == (32, 4)
    assert exported[f"{first}.alpha"].item() == 8.0
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in exported
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in exported
    assert exported["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 32)
    pattern = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(pattern.match(key) for key in exported)
    layers = {key.split(".")[0] for key in exported}
    assert len(exported) == 3 * len(layers)


def test_kohya_export_converts_back_to_the_same_deltas(tiny_model: BaseModel, lora_te_run: Path) -> None:
    from_diffusers = lora_deltas_from_diffusers(lora_te_run)
    from_kohya = lora_deltas_from_kohya(lora_te_run / KOHYA_LORA_FILE, tiny_model.family)
    assert set(from_kohya) == set(from_diffusers)
    assert any(key.startswith("text_encoder.") for key in from_kohya)
    for key, delta in from_diffusers.items():
        assert torch.allclose(from_kohya[key], delta, atol=1e-7), key
        assert delta.abs().max() > 0, key


@pytest.mark.parametrize("which", ["unet only", "unet and text encoder, alpha 8"])
def test_diffusers_reads_the_kohya_file_like_the_original(which: str, request: pytest.FixtureRequest) -> None:
    # diffusers converts A1111/kohya files itself: a third-party reader of our export.
    run_dir: Path = request.getfixturevalue("lora_run" if which == "unet only" else "lora_te_run")
    original = fresh_pipeline()
    original.load_lora_weights(str(run_dir))
    converted = fresh_pipeline()
    converted.load_lora_weights(str(run_dir), weight_name=KOHYA_LORA_FILE)
    assert np.abs(sample(converted) - sample(original)).max() < 1e-3
    ids = converted.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(converted.text_encoder(ids)[0], original.text_encoder(ids)[0], atol=1e-5)


def test_export_rewrites_the_file(tiny_model: BaseModel, lora_run: Path) -> None:
    (lora_run / KOHYA_LORA_FILE).unlink()
    assert export_kohya_lora(lora_run, tiny_model.family) == lora_run / KOHYA_LORA_FILE
    assert (lora_run / KOHYA_LORA_FILE).is_file()


def test_full_fine_tune_loads(tiny_model: BaseModel, tmp_path: Path) -> None:
    run_dir = _train(tiny_model, tmp_path, method="full", steps=2, learning_rate=1e-3)
    pipe = load_trained_pipeline(tiny_model, run_dir)
    saved = load_file(str(run_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(pipe.unet.state_dict()[key], saved[key])
    assert not torch.equal(tiny_model.unet.state_dict()[key], saved[key])
    assert pipe.text_encoder is tiny_model.text_encoder  # not trained: the base one
    with pytest.raises(EngineInputError, match="only LoRA runs"):
        export_kohya_lora(run_dir, tiny_model.family)


def test_missing_weights_are_reported(tiny_model: BaseModel, tmp_path: Path) -> None:
    with pytest.raises(EngineInputError, match="no trained weights"):
        load_trained_pipeline(tiny_model, tmp_path)
    with pytest.raises(EngineInputError, match=LORA_WEIGHTS_FILE):
        lora_deltas_from_diffusers(tmp_path)


def test_the_web_app_offers_the_files_a_run_writes() -> None:
    """The gallery's model downloads name these files without importing the engine (no torch in the web)."""
    from app.galleries import model_export

    assert model_export.KOHYA_LORA_FILE == KOHYA_LORA_FILE
    assert model_export.DIFFUSERS_LORA_FILE == LORA_WEIGHTS_FILE
