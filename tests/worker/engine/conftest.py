"""Fixtures for engine tests: the seeded tiny model and synthetic subject photos."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine.models import BaseModel, build_builtin
from worker.engine.threads import choose_threads


@pytest.fixture(scope="session", autouse=True)
def worker_threads() -> Iterator[None]:
    """The engine tests use the PyTorch threads a worker on this machine would (worker.engine.threads):
    PyTorch's default, a thread per core, spins against any other work on a small machine (beside one
    busy process the tiny models' preservation tests took 114–141 s instead of 6–10 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(choose_threads())
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model() -> BaseModel:
    """The built-in tiny model on the CPU. Shared: tests must not modify its weights."""
    return build_builtin("tiny", seed=0, device=torch.device("cpu"), dtype=torch.float32)


def make_subject_photo(path: Path, seed: int, size: tuple[int, int] = (160, 120)) -> Path:
    """A synthetic 'subject' photo: a coloured blob on a textured background, sharp enough to pass."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    background = rng.integers(0, 60, size=(h, w, 3)).astype(np.float32) + 40
    cx, cy, r = w * (0.4 + 0.2 * rng.random()), h * (0.4 + 0.2 * rng.random()), min(w, h) * 0.3
    blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < r**2
    colour = np.array([200, 140, 60], dtype=np.float32) + rng.integers(-20, 20, size=3)
    checker = ((xx // 6 + yy // 6) % 2)[..., None] * 30.0
    image = np.where(blob[..., None], colour + checker, background)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=95)
    return path


@pytest.fixture
def subject_photos(tmp_path: Path) -> list[Path]:
    """Four distinct synthetic photos of one subject."""
    folder = tmp_path / "photos"
    folder.mkdir()
    return [make_subject_photo(folder / f"photo{i}.jpg", seed=i) for i in range(4)]
