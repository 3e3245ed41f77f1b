"""The class-prior bank: class images ("a photo of a dog") shared by every job of the same class.

Generating the class images costs more than the whole fine-tune (about 4x for SD 1.5 at 200
images), yet they depend only on the base model, the class prompt and the sampler settings. So they
live in a bank keyed by exactly those, and a job generates only what the bank is missing.

Layout: ``bank_root/<key>/`` holds ``00000.png``, ``00001.png``, ... and ``meta.json`` (what the key
stands for). Image ``i`` is always drawn from the seed derived from ``(key, i)``, so two fills make
the same image ``i`` and a partly filled bank is completed with exactly the images a full fill
would have made.

Concurrency: two jobs (two processes) may fill the same bank at once. Each fill takes an exclusive
``fcntl.flock`` on ``bank_root/<key>/.lock`` for its whole claim-and-generate step, so the second
waits, then finds the images there and reuses them. Every file is written to a temporary name and
``os.replace``-d into place, so a crash never leaves a torn image under a real name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.engine.errors import EngineError, EngineInputError
from worker.engine.families import family_of_pipeline
from worker.engine.models import BaseModel
from worker.engine.progress import CancelCheck, Progress, ProgressCallback, Throttle, check_cancel, eta
from worker.engine.spec import DEFAULT_NEGATIVE

META_FILE = "meta.json"
LOCK_FILE = ".lock"
IMAGE_SUFFIX = ".png"
MAX_ATTEMPTS = 4  # per image: the first seed and three retries before the fill gives up
# A sampled image this dark and this flat is a failed sample (or a safety checker's black-out).
BLACK_MEAN_MAX = 0.04
BLACK_STD_MAX = 0.02
LOCK_POLL_SECONDS = 0.2


class PriorBankError(EngineError):
    """The base model kept producing unusable (black or non-finite) class images."""


@dataclass
class PriorBankResult:
    """The ``count`` class images to train with, and how many this fill made or found."""

    images: list[Path]
    generated: int
    reused: int
    key: str
    directory: Path


def bank_key(model_fingerprint: str, class_prompt: str, resolution: int, steps: int, guidance: float,
             negative_prompt: str, sampler: str) -> str:
    """The bank key: a short hash of everything that decides what the class images look like."""
    fields = _key_fields(model_fingerprint, class_prompt, resolution, steps, guidance, negative_prompt, sampler)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def _key_fields(model_fingerprint: str, class_prompt: str, resolution: int, steps: int, guidance: float,
                negative_prompt: str, sampler: str) -> dict[str, Any]:
    return {
        "model_fingerprint": model_fingerprint,
        "class_prompt": class_prompt,
        "resolution": resolution,
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "negative_prompt": negative_prompt,
    }


def image_seed(key: str, index: int, attempt: int = 0) -> int:
    """The seed of bank image ``index`` (``attempt`` > 0 when earlier seeds gave unusable images)."""
    digest = hashlib.sha256(f"{key}:{index}:{attempt}".encode()).hexdigest()
    return int(digest[:15], 16)  # 60 bits: fits every torch generator


def image_path(directory: Path, index: int) -> Path:
    return directory / f"{index:05d}{IMAGE_SUFFIX}"


def is_unusable(pixels: np.ndarray) -> str | None:
    """Why a sampled image (float array in [0, 1]) must not enter the bank, or ``None`` when it is fine."""
    if not np.isfinite(pixels).all():
        return "non-finite values"
    if float(pixels.mean()) < BLACK_MEAN_MAX and float(pixels.std()) < BLACK_STD_MAX:
        return "black"
    return None


def is_valid_bank_image(path: Path, resolution: int) -> bool:
    """True when ``path`` is a complete PNG of ``resolution`` x ``resolution``."""
    try:
        with Image.open(path) as image:
            if image.size != (resolution, resolution):
                return False
            image.verify()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


@contextlib.contextmanager
def bank_lock(directory: Path, should_cancel: CancelCheck | None = None) -> Iterator[None]:
    """Hold the bank directory's exclusive lock; polls so a waiting job can still be cancelled."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                check_cancel(should_cancel)
                time.sleep(LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_atomically(path: Path, write: Any) -> None:
    """Write through ``write(temporary_path)`` and rename into ``path``: never a torn file under ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_meta(directory: Path, fields: dict[str, Any], count: int) -> None:
    meta_path = directory / META_FILE
    existing: dict[str, Any] = {}
    if meta_path.exists():
        with contextlib.suppress(OSError, ValueError):
            existing = dict(json.loads(meta_path.read_text()))
    meta = {**fields, "key": directory.name, "images": max(count, int(existing.get("images", 0)))}
    _write_atomically(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True)))


def render_batch(
    pipe: Any,
    prompt: str,
    negative_prompt: str,
    seeds: list[int],
    *,
    resolution: int,
    steps: int,
    guidance: float,
    autocast_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Sample one image per seed with the pipeline's family sampler; float pixels in [0, 1], shape
    (len(seeds), H, W, 3).

    Each image has its own generator, so image ``i``'s pixels depend on its seed alone, not on
    which other images share its batch. The noise is drawn on the CPU so a seed gives the same
    image on every machine. ``autocast_dtype`` (bf16 or fp16 on a GPU) runs the fp32 pipeline
    under autocast.
    """
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    return family_of_pipeline(pipe).render(pipe, [prompt] * len(seeds), negative_prompt=negative_prompt, steps=steps,
                                           guidance=guidance, resolution=resolution, generators=generators,
                                           autocast_dtype=autocast_dtype)


def _save_png(pixels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8))
    _write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def fill_prior_bank(
    model: BaseModel,
    bank_root: Path,
    class_prompt: str,
    count: int,
    *,
    resolution: int,
    steps: int = 25,
    guidance: float = 7.5,
    negative_prompt: str = DEFAULT_NEGATIVE,
    batch_size: int = 4,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> PriorBankResult:
    """Make sure the bank for ``class_prompt`` holds ``count`` valid images; generate only the missing ones.

    Returns the first ``count`` images of the bank (a bank may hold more, from a job that asked for
    more). Raises :class:`EngineInputError` on bad arguments, :class:`PriorBankError` when an image
    stays black or non-finite after ``MAX_ATTEMPTS`` seeds, and ``Cancelled`` when asked to stop.
    """
    if not class_prompt.strip():
        raise EngineInputError("class prompt is empty")
    if count < 0:
        raise EngineInputError(f"prior image count {count} is negative")
    if resolution <= 0 or resolution % 8:
        raise EngineInputError(f"resolution {resolution} must be a positive multiple of 8")
    if steps <= 0:
        raise EngineInputError(f"prior sampling steps {steps} must be positive")
    if batch_size <= 0:
        raise EngineInputError(f"prior batch size {batch_size} must be positive")

    sampler = model.family.sampler_id
    fields = _key_fields(model.fingerprint, class_prompt, resolution, steps, guidance, negative_prompt, sampler)
    key = bank_key(model.fingerprint, class_prompt, resolution, steps, guidance, negative_prompt, sampler)
    directory = Path(bank_root) / key
    images = [image_path(directory, index) for index in range(count)]
    report = Throttle(progress)
    started = time.monotonic()

    with bank_lock(directory, should_cancel):
        missing = [index for index in range(count) if not is_valid_bank_image(images[index], resolution)]
        reused = count - len(missing)
        report(Progress(stage="priors", step=reused, total=count, reused=reused,
                        message=f"{reused} of {count} class images already in the bank"), force=True)
        _write_meta(directory, fields, count)
        if missing:
            pipe: Any = model.pipeline()
            pipe.to(model.device)
            done = reused
            for start in range(0, len(missing), batch_size):
                check_cancel(should_cancel)
                batch = missing[start : start + batch_size]
                _generate_valid(pipe, class_prompt, negative_prompt, key, batch, directory,
                                resolution=resolution, steps=steps, guidance=guidance, autocast_dtype=model.dtype)
                done += len(batch)
                elapsed, remaining = eta(started, done - reused, count - reused)
                report(Progress(stage="priors", step=done, total=count, reused=reused,
                                elapsed=elapsed, eta_seconds=remaining))
    return PriorBankResult(images=images, generated=len(missing), reused=reused, key=key, directory=directory)


def _generate_valid(
    pipe: Any,
    class_prompt: str,
    negative_prompt: str,
    key: str,
    indices: list[int],
    directory: Path,
    *,
    resolution: int,
    steps: int,
    guidance: float,
    autocast_dtype: torch.dtype,
) -> None:
    """Generate and save images ``indices``; an unusable one is redrawn with its next seed."""
    pending = list(indices)
    attempt = 0
    while pending:
        if attempt >= MAX_ATTEMPTS:
            raise PriorBankError(
                f"the base model kept producing black or non-finite class images for {class_prompt!r} "
                f"(images {', '.join(map(str, pending))} failed {MAX_ATTEMPTS} seeds each)"
            )
        seeds = [image_seed(key, index, attempt) for index in pending]
        pixels = render_batch(pipe, class_prompt, negative_prompt, seeds,
                              resolution=resolution, steps=steps, guidance=guidance, autocast_dtype=autocast_dtype)
        still_pending = []
        for index, image in zip(pending, pixels, strict=True):
            if is_unusable(image) is None:
                _save_png(image, image_path(directory, index))
            else:
                still_pending.append(index)
        pending = still_pending
        attempt += 1
