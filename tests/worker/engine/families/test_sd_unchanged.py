"""SD 1.x behaviour pinned across the move behind the family interface.

The numbers were recorded on the engine before the family interface existed (commit 161a2a5): the
same seed must keep giving the same weights, the same fingerprint (so existing prior banks stay
valid) and the same loss curves, with and without a trained text encoder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.worker.engine.conftest import make_subject_photo
from tests.worker.engine.test_train import make_class_image
from worker.engine.models import BaseModel, build_builtin
from worker.engine.train import TrainConfig, train

TINY_FINGERPRINT = "6816cfcd3325a1fc"
CURVES = {
    "lora, Min-SNR, offset noise": (
        {"min_snr_gamma": 5.0, "offset_noise": 0.05},
        [2.4610419273376465, 2.191087245941162, 1.1479707956314087, 2.240044116973877, 2.012448787689209,
         2.3386404514312744],
    ),
    "lora with the text encoder": (
        {"train_text_encoder": True},
        [2.4528326988220215, 2.3037545680999756, 2.3114633560180664, 2.1281371116638184, 1.9222332239151,
         2.149265766143799],
    ),
}


def test_the_tiny_models_fingerprint_is_unchanged(tiny_model: BaseModel) -> None:
    assert build_builtin("tiny", seed=0, device=torch.device("cpu"), dtype=torch.float32).fingerprint \
        == TINY_FINGERPRINT
    assert tiny_model.fingerprint == TINY_FINGERPRINT


@pytest.mark.parametrize("name", list(CURVES))
def test_the_loss_curve_is_unchanged(tiny_model: BaseModel, tmp_path: Path, name: str) -> None:
    settings, expected = CURVES[name]
    (tmp_path / "photos").mkdir()
    (tmp_path / "classes").mkdir()
    photos = [make_subject_photo(tmp_path / "photos" / f"{i}.jpg", seed=i) for i in range(4)]
    classes = [make_class_image(tmp_path / "classes" / f"{i}.png", seed=50 + i) for i in range(4)]
    config = TrainConfig(steps=6, resolution=64, rank=4, learning_rate=1e-3, **settings)  # type: ignore[arg-type]
    result = train(tiny_model, config, instance_images=photos, instance_prompt="a photo of sks dog",
                   class_images=classes, class_prompt="a photo of dog", run_dir=tmp_path / "run")
    # Float32 on the CPU: the same kernels give the same bits; other CPUs may differ in the last places.
    assert result.loss_history == pytest.approx(expected, rel=1e-4)
