"""Base models: the built-ins are seeded and cheap, loading fails clearly, fingerprints are stable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from worker.engine.errors import EngineInputError
from worker.engine.models import (
    ARCHITECTURES,
    BaseModel,
    build_builtin,
    build_components,
    load_base_model,
    tiny_tokenizer,
)

CPU = torch.device("cpu")


def test_tiny_builds_fast_and_the_same_seed_gives_identical_weights() -> None:
    started = time.monotonic()
    first = build_builtin("tiny", seed=7, device=CPU, dtype=torch.float32)
    assert time.monotonic() - started < 2.0
    second = build_builtin("tiny", seed=7, device=CPU, dtype=torch.float32)
    for name, tensor in first.unet.state_dict().items():
        assert torch.equal(tensor, second.unet.state_dict()[name]), name
    assert first.fingerprint == second.fingerprint
    assert build_builtin("tiny", seed=8, device=CPU, dtype=torch.float32).fingerprint != first.fingerprint


def test_tiny_is_a_few_megabytes_at_64_px(tiny_model: BaseModel) -> None:
    parameters = sum(p.numel() for m in (tiny_model.unet, tiny_model.vae, tiny_model.text_encoder)
                     for p in m.parameters())
    assert parameters * 4 < 8 * 1024 * 1024
    assert tiny_model.resolution == 64
    assert tiny_model.vae_scale_factor == 8
    assert tiny_model.is_demo


def test_building_does_not_disturb_the_global_random_state() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_builtin("tiny", seed=0, device=CPU, dtype=torch.float32)
    assert torch.equal(torch.rand(3), expected)


def test_fingerprint_is_the_same_in_every_process() -> None:
    """Another process, with another string-hash seed than this one, computes the same fingerprint."""
    script = "from worker.engine.models import build_builtin; print(build_builtin('tiny', seed=0).fingerprint)"
    other_seed = str(int(os.environ.get("PYTHONHASHSEED") or "0") + 1)  # this process's, when set, plus one
    env = {**os.environ, "PYTHONHASHSEED": other_seed, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True,
                            cwd=Path(__file__).resolve().parents[3])
    assert result.stdout.strip().splitlines()[-1] == build_builtin("tiny", seed=0).fingerprint


def test_sd15_arch_has_the_real_sd15_sizes() -> None:
    # Built on the meta device: the shapes without the 4 GB of weights.
    with torch.device("meta"):
        text_encoder, vae, unet = build_components(ARCHITECTURES["sd15-arch"], tiny_tokenizer())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text_encoder) == 123_060_480
    assert unet.config.cross_attention_dim == 768


def test_a_saved_diffusers_folder_loads_with_the_same_fingerprint(tiny_model: BaseModel, tmp_path: Path) -> None:
    tiny_model.pipeline().save_pretrained(tmp_path / "tiny")
    loaded = load_base_model(str(tmp_path / "tiny"), device=CPU, dtype=torch.float32)
    assert loaded.fingerprint == tiny_model.fingerprint
    assert loaded.resolution == 64
    assert not loaded.is_demo


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-model", "unknown base model 'no-such-model'"),
        ("./missing/folder", "unknown base model './missing/folder'"),
    ],
)
def test_unknown_base_models_are_refused_by_name(spec: str, message: str) -> None:
    with pytest.raises(EngineInputError, match=message):
        load_base_model(spec, device=CPU, dtype=torch.float32)


def test_a_folder_that_is_not_a_diffusers_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineInputError, match="no model_index.json"):
        load_base_model(str(tmp_path), device=CPU, dtype=torch.float32)


def test_a_weights_file_of_another_kind_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(EngineInputError, match="not a .safetensors or .ckpt file"):
        load_base_model(str(weights), device=CPU, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Families


def test_sdxl_arch_has_the_real_sdxl_sizes() -> None:
    from worker.engine.families.sdxl import build as build_sdxl

    with torch.device("meta"):
        modules, _, _, resolution = build_sdxl("sdxl-arch", tiny_tokenizer())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(modules["unet"]) == 2_567_463_684
    assert count(modules["vae"]) == 83_653_863
    assert count(modules["text_encoder"]) == 123_060_480  # CLIP ViT-L
    assert count(modules["text_encoder_2"]) == 694_659_840  # OpenCLIP ViT-bigG with its projection
    assert resolution == 1024


def test_tiny_sdxl_is_an_sdxl_model_that_builds_in_seconds() -> None:
    started = time.monotonic()
    model = build_builtin("tiny-sdxl", seed=0, device=CPU, dtype=torch.float32)
    assert time.monotonic() - started < 5.0
    assert model.family.name == "sdxl" and model.resolution == 64 and model.is_demo
    assert set(model.modules) == {"text_encoder", "text_encoder_2", "vae", "unet"}
    assert model.fingerprint != build_builtin("tiny", seed=0, device=CPU, dtype=torch.float32).fingerprint


@pytest.mark.parametrize("spec", ["tiny", "tiny-sdxl"])
def test_a_saved_folder_of_each_family_loads_as_that_family(spec: str, tmp_path: Path) -> None:
    built = build_builtin(spec, seed=0, device=CPU, dtype=torch.float32)
    built.pipeline().save_pretrained(tmp_path / spec)
    loaded = load_base_model(str(tmp_path / spec), device=CPU, dtype=torch.float32)
    assert loaded.family is built.family
    assert loaded.fingerprint == built.fingerprint


def test_a_folder_of_an_unsupported_pipeline_says_what_it_is_and_what_is_supported(tmp_path: Path) -> None:
    index = '{"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1"}'
    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(EngineInputError, match=r"StableDiffusion3Pipeline; supported: .*StableDiffusionXLPipeline"):
        load_base_model(str(tmp_path), device=CPU, dtype=torch.float32)


def test_a_single_sdxl_file_loads_as_the_sdxl_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.engine import single_file

    built = build_builtin("tiny-sdxl", seed=0, device=CPU, dtype=torch.float32)
    path = tmp_path / "tiny-sdxl.safetensors"
    single_file.save_single_file(built.pipeline(), path)
    built.pipeline().save_pretrained(tmp_path / "configs")
    real_loader = single_file.load_single_file
    # The shipped SDXL configuration has the real sizes; this file has the tiny ones.
    monkeypatch.setattr(single_file, "load_single_file", lambda p: real_loader(
        p, tokenizers=dict(built.tokenizers), config_dir=tmp_path / "configs"))
    loaded = load_base_model(str(path), device=CPU, dtype=torch.float32)
    assert loaded.family.name == "sdxl"
    assert loaded.fingerprint == built.fingerprint
