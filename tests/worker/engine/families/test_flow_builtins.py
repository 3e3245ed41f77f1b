"""The FLUX.2 klein and Z-Image built-ins: real sizes on the meta device, tiny ones on the CPU, and a
saved tiny model loading back as a diffusers folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from worker.engine.families import BUILTINS
from worker.engine.models import build_builtin, load_base_model

# Parameter counts of the *-arch built-ins, counted on the meta device. The published sizes they
# match: Qwen3-4B "4.0B, 3.6B non-embedding" (Qwen3 model card); FLUX.2 klein "4B" (its transformer);
# Z-Image "6B" (its transformer); the FLUX.1 VAE that Z-Image uses, 83.8M.
ARCH_COUNTS = {
    "flux2-klein-arch": {"text_encoder": 4_022_468_096, "vae": 84_046_115, "transformer": 3_875_544_576},
    "zimage-arch": {"text_encoder": 4_022_468_096, "vae": 83_819_683, "transformer": 6_154_908_736},
}


def build_on_meta(name: str) -> tuple[dict[str, torch.nn.Module], int]:
    with torch.device("meta"):
        modules, _, _, resolution = BUILTINS[name][1](name, None)
    return modules, resolution


@pytest.mark.parametrize("name", sorted(ARCH_COUNTS))
def test_arch_builtins_have_the_real_models_sizes_on_the_meta_device(name: str) -> None:
    modules, resolution = build_on_meta(name)
    counts = {key: sum(p.numel() for p in module.parameters()) for key, module in modules.items()}
    assert counts == ARCH_COUNTS[name]
    assert resolution == 1024
    assert all(p.device.type == "meta" for module in modules.values() for p in module.parameters())
    text: Any = modules["text_encoder"]
    embeddings = text.get_input_embeddings().weight.numel()
    assert round(counts["text_encoder"] / 1e9, 1) == 4.0
    assert round((counts["text_encoder"] - embeddings) / 1e9, 1) == 3.6
    published = {"flux2-klein-arch": 4.0, "zimage-arch": 6.0}[name]
    assert abs(counts["transformer"] / 1e9 - published) < 0.2


@pytest.mark.parametrize("name", ["tiny-flux2", "tiny-zimage"])
def test_tiny_builtins_are_seeded_and_load_back_from_a_saved_folder(name: str, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    model = build_builtin(name, seed=0, device=cpu, dtype=torch.float32)
    assert build_builtin(name, seed=0, device=cpu, dtype=torch.float32).fingerprint == model.fingerprint
    assert build_builtin(name, seed=1, device=cpu, dtype=torch.float32).fingerprint != model.fingerprint
    parameters = sum(p.numel() for module in model.modules.values() for p in module.parameters())
    assert parameters < 2_000_000  # seconds on a CPU

    model.pipeline().save_pretrained(str(tmp_path / "saved"))
    loaded = load_base_model(str(tmp_path / "saved"), device=cpu, dtype=torch.float32)
    assert loaded.family is model.family
    assert loaded.fingerprint == model.fingerprint
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "a dog"}], tokenize=False,
                                                add_generation_prompt=True) == \
        model.tokenizer.apply_chat_template([{"role": "user", "content": "a dog"}], tokenize=False,
                                            add_generation_prompt=True)
