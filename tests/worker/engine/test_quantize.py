"""The int8 frozen base of LoRA runs: close to the full-precision layer, half its memory, and it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from tests.worker.engine.conftest import make_subject_photo
from worker.engine.errors import Cancelled, EngineInputError
from worker.engine.models import build_builtin
from worker.engine.quantize import Int8Linear, quantize_frozen_linears, weight_bytes
from worker.engine.train import TrainConfig, denoising_loss, train
from worker.engine.weights import load_trained_pipeline

PROMPT = "a photo of xip dog"


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_an_int8_layer_computes_what_the_layer_did_in_a_quarter_of_the_fp32_bytes() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    quantized = Int8Linear(linear)
    inputs = torch.randn(4, 256)
    expected = linear(inputs)
    error = (quantized(inputs) - expected).norm() / expected.norm()
    assert error < 0.01
    assert torch.allclose(quantized.weight, linear.weight, atol=linear.weight.abs().max().item() / 127)
    # int8 weights plus one fp32 scale per row (and the bias) against fp32 weights.
    assert weight_bytes(quantized) == 256 * 128 + 4 * 128 + 4 * 128
    assert weight_bytes(quantized) < 0.27 * weight_bytes(linear)


def test_only_the_frozen_layers_are_quantized_and_the_adapters_still_learn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"]), model)
    assert quantize_frozen_linears(model) == 2  # the LoRA layer's base, and the plain last layer
    base_layer = model[0].base_layer  # type: ignore[union-attr]
    assert isinstance(base_layer, Int8Linear) and isinstance(model[2], Int8Linear)
    adapters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert adapters and all(parameter.dtype == torch.float32 for parameter in adapters)
    model(torch.randn(2, 32)).square().sum().backward()
    assert all(parameter.grad is not None for parameter in adapters)


def test_a_full_fine_tune_cannot_quantize_its_base() -> None:
    with pytest.raises(EngineInputError, match="quantize_base='int8' needs method='lora'"):
        TrainConfig(method="full", quantize_base="int8").validate()
    with pytest.raises(EngineInputError, match="quantize_base"):
        TrainConfig(quantize_base="nf3").validate()  # type: ignore[arg-type]


def test_a_lora_run_on_the_int8_base_learns_and_its_adapters_load_on_the_full_base(tmp_path: Path) -> None:
    model = build_builtin("tiny-flux2", seed=0, device=torch.device("cpu"), dtype=torch.float32)
    photos = [make_subject_photo(tmp_path / f"photo{i}.jpg", seed=i) for i in range(4)]
    # Bank-free preservation: its targets come from the base with the adapters off, here the int8 base.
    values: dict[str, Any] = {"steps": 24, "resolution": 64, "rank": 8, "learning_rate": 1e-2,
                              "prior_source": "base_model"}
    common: dict[str, Any] = {"instance_images": photos, "instance_prompt": PROMPT, "class_images": [],
                              "class_prompt": "a photo of dog"}
    before = denoising_loss(model, photos, PROMPT, resolution=64)
    full = train(model, TrainConfig(**values), run_dir=tmp_path / "full", **common)
    quantized = train(model, TrainConfig(**values, quantize_base="int8"), run_dir=tmp_path / "int8", **common)
    # The first step sees the same batch through nearly the same weights.
    assert quantized.loss_history[0] == pytest.approx(full.loss_history[0], rel=0.02)
    after = {}
    for name in ("full", "int8"):
        pipe = load_trained_pipeline(model, tmp_path / name)  # onto the shared full-precision base
        after[name] = denoising_loss(model, photos, PROMPT, resolution=64, denoiser=pipe.transformer)
    assert after["int8"] < 0.95 * before  # the subject is learned
    assert after["int8"] < before - 0.8 * (before - after["full"])  # about as well as on the full base
    assert not any(isinstance(layer, Int8Linear) for layer in model.modules["transformer"].modules())


def test_a_run_checkpointed_on_the_int8_base_resumes_on_the_full_base(tmp_path: Path) -> None:
    """A job retried on a card of another size (int8 is chosen below Family.int8_base_memory_gb)
    continues from its checkpoint instead of failing on a setting that changes no trained weight."""
    model = build_builtin("tiny-flux2", seed=0, device=torch.device("cpu"), dtype=torch.float32)
    photos = [make_subject_photo(tmp_path / f"photo{i}.jpg", seed=i) for i in range(2)]
    values: dict[str, Any] = {"steps": 4, "resolution": 64, "rank": 4, "checkpoint_every": 2,
                              "prior_source": "base_model"}
    common: dict[str, Any] = {"instance_images": photos, "instance_prompt": PROMPT, "class_images": [],
                              "class_prompt": "a photo of dog", "run_dir": tmp_path / "run"}
    checks = iter([False, False, True])
    with pytest.raises(Cancelled):
        train(model, TrainConfig(**values, quantize_base="int8"), should_cancel=lambda: next(checks), **common)
    resumed = train(model, TrainConfig(**values, quantize_base="none"), **common)
    assert resumed.resumed_from == 2 and len(resumed.loss_history) == 4
