"""Prompt packs to images: sample a trained pipeline and save each image with how it was made.

The packs themselves live in :mod:`worker.engine.prompts` (pure Python, so the web app can list
them); this module exposes them as ``PROMPT_PACKS`` and turns templates into prompts and images.

Free prompts: a template holds ``{subject}``, which becomes "[V] [class noun]" (e.g. "xqz dog").
A free prompt without ``{subject}`` gets "a photo of {subject}, " in front ("on a skateboard" →
"a photo of xqz dog, on a skateboard"), so every prompt names the fine-tuned subject.

Every image is a PNG named ``sample-NNNN.png`` carrying its metadata twice: PNG text chunks
(``parameters`` in the AUTOMATIC1111 style that image viewers show, and ``studio`` with the same
record as JSON) and a line in the folder's ``index.json``. Each image has its own seed, so any one
of them can be made again.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from worker.engine.errors import EngineInputError
from worker.engine.families import family_of_pipeline
from worker.engine.progress import CancelCheck, Progress, ProgressCallback, Throttle, check_cancel, eta
from worker.engine.prompts import DEFAULT_PACK, STYLE_PACKS, expand, normalize_free_prompt, size_for, split_shape
from worker.engine.spec import DEFAULT_SAMPLE_NEGATIVE

PROMPT_PACKS: dict[str, tuple[str, ...]] = {name: pack.prompts for name, pack in STYLE_PACKS.items()}
PACK_KINDS: dict[str, str] = {name: pack.kind for name, pack in STYLE_PACKS.items()}
DEFAULT_PACKS: dict[str, str] = {str(kind): name for kind, name in DEFAULT_PACK.items()}
INDEX_FILE = "index.json"
SAMPLE_PATTERN = re.compile(r"^sample-(\d+)\.png$")


@dataclass
class SampleRecord:
    """One generated image and everything needed to make it again."""

    path: Path
    prompt: str
    seed: int
    steps: int
    guidance: float
    negative_prompt: str
    base_model: str

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "prompt": self.prompt,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "negative_prompt": self.negative_prompt,
            "base_model": self.base_model,
        }


def pack_templates(pack: str | None, subject_kind: str) -> tuple[str, ...]:
    """The templates of ``pack``, or of the default pack for ``subject_kind`` when ``pack`` is None."""
    if pack is None:
        if subject_kind not in DEFAULT_PACKS:
            raise EngineInputError(f"unknown subject kind {subject_kind!r}; choose one of {', '.join(DEFAULT_PACKS)}")
        pack = DEFAULT_PACKS[subject_kind]
    if pack not in PROMPT_PACKS:
        raise EngineInputError(f"unknown prompt pack {pack!r}; choose one of {', '.join(PROMPT_PACKS)}")
    return PROMPT_PACKS[pack]


def expand_prompts(templates: Sequence[str], identifier: str, class_noun: str) -> list[str]:
    """Prompts from ``templates``: ``{subject}`` → "identifier class_noun"; a template without it is prefixed.

    Raises :class:`EngineInputError` for an empty template, identifier or class noun.
    """
    if not identifier.strip() or not class_noun.strip():
        raise EngineInputError("identifier and class noun must both be given to expand prompts")
    prompts = []
    for template in templates:
        try:
            normalized = normalize_free_prompt(template)
        except ValueError:
            raise EngineInputError("a prompt is empty") from None
        prompts.append(expand(normalized, identifier.strip(), class_noun.strip()))
    return prompts


def next_sample_number(out_dir: Path) -> int:
    """The number after the highest ``sample-NNNN.png`` in ``out_dir`` (0 for an empty folder)."""
    numbers = [int(match.group(1)) for p in out_dir.glob("sample-*.png") if (match := SAMPLE_PATTERN.match(p.name))]
    return max(numbers, default=-1) + 1


def read_index(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/index.json`` (empty when there is none)."""
    path = out_dir / INDEX_FILE
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text())["images"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineInputError(f"{path} is unreadable: {exc}") from exc


def _write_index(out_dir: Path, records: list[dict[str, Any]]) -> None:
    path = out_dir / INDEX_FILE
    temporary = path.with_name(f".{INDEX_FILE}.tmp")
    temporary.write_text(json.dumps({"images": records}, indent=2))
    os.replace(temporary, path)


def png_metadata(record: SampleRecord, resolution: int, sampler: str = "DPM++ 2M",
                 size: tuple[int, int] | None = None) -> PngInfo:
    """PNG text chunks for ``record``: A1111-style ``parameters`` and a JSON ``studio`` chunk.
    ``size`` is (width, height) when the picture is not ``resolution`` square."""
    width, height = size or (resolution, resolution)
    info = PngInfo()
    parameters = (
        f"{record.prompt}\nNegative prompt: {record.negative_prompt}\n"
        f"Steps: {record.steps}, Sampler: {sampler}, CFG scale: {record.guidance}, Seed: {record.seed}, "
        f"Size: {width}x{height}, Model: {record.base_model}"
    )
    info.add_text("parameters", parameters)
    info.add_text("studio", json.dumps({**record.to_json(), "resolution": resolution, "width": width,
                                        "height": height}))
    return info


def _batches(jobs: list[tuple[str, int, tuple[int, int]]],
             batch_size: int) -> Iterator[list[tuple[str, int, tuple[int, int]]]]:
    """``jobs`` in order, at most ``batch_size`` at a time, each batch of one picture size."""
    batch: list[tuple[str, int, tuple[int, int]]] = []
    for job in jobs:
        if batch and (len(batch) == batch_size or job[2] != batch[0][2]):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def sample_images(
    pipe: Any,
    prompts: Sequence[str],
    *,
    images_per_prompt: int,
    out_dir: Path,
    seed: int,
    steps: int = 25,
    guidance: float = 7.5,
    negative_prompt: str = DEFAULT_SAMPLE_NEGATIVE,
    batch_size: int = 4,
    resolution: int,
    base_model: str,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[SampleRecord]:
    """Sample ``images_per_prompt`` images of each prompt into ``out_dir``; image ``k`` gets seed ``seed + k``.

    ``pipe`` is a family's pipeline (:meth:`BaseModel.pipeline`); its family samples. Images are
    numbered after those already in ``out_dir`` and appended to its ``index.json``, so calling
    again adds to a gallery without overwriting it. Raises :class:`EngineInputError` on bad
    arguments and ``Cancelled`` between batches when asked to stop.
    """
    if not prompts:
        raise EngineInputError("no prompts to sample")
    if any(not prompt.strip() for prompt in prompts):
        raise EngineInputError("a prompt is empty")
    for name, value in (("images per prompt", images_per_prompt), ("steps", steps), ("batch size", batch_size)):
        if value <= 0:
            raise EngineInputError(f"{name} must be positive (got {value})")
    if resolution <= 0 or resolution % 8:
        raise EngineInputError(f"resolution {resolution} must be a positive multiple of 8")

    family = family_of_pipeline(pipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A prompt may end in a shape marker ("... (portrait)"): it sets the picture's size and is not
    # painted. Pictures of one size share a sampling call, so batches break where the size changes.
    shaped = [split_shape(prompt) for prompt in prompts]
    jobs = [(text, seed + number, size_for(shape, resolution)) for number, (text, shape) in
            enumerate(each for each in shaped for _ in range(images_per_prompt))]
    first_number = next_sample_number(out_dir)
    index = read_index(out_dir)
    report = Throttle(progress)
    started = time.monotonic()
    records: list[SampleRecord] = []
    report(Progress(stage="sampling", step=0, total=len(jobs)), force=True)
    for batch in _batches(jobs, batch_size):
        check_cancel(should_cancel)
        size = batch[0][2]
        generators = [torch.Generator(device="cpu").manual_seed(job_seed) for _, job_seed, _ in batch]
        images = family.render(pipe, [prompt for prompt, _, _ in batch], negative_prompt=negative_prompt, steps=steps,
                               guidance=guidance, resolution=resolution, generators=generators,
                               autocast_dtype=autocast_dtype, size=size)
        for (prompt, job_seed, _), pixels in zip(batch, images, strict=True):
            path = out_dir / f"sample-{first_number + len(records):04d}.png"
            record = SampleRecord(path, prompt, job_seed, steps, guidance, negative_prompt, base_model)
            image = Image.fromarray(np.clip(np.round(np.nan_to_num(pixels) * 255.0), 0, 255).astype(np.uint8))
            temporary = path.with_name(f".{path.name}.tmp")
            image.save(temporary, format="PNG",
                       pnginfo=png_metadata(record, resolution, family.sampler_name, size=size))
            os.replace(temporary, path)
            records.append(record)
        index.extend(record.to_json() for record in records[len(records) - len(batch) :])
        _write_index(out_dir, index)  # after every batch, so a crash leaves an index of what exists
        elapsed, remaining = eta(started, len(records), len(jobs))
        report(Progress(stage="sampling", step=len(records), total=len(jobs), elapsed=elapsed, eta_seconds=remaining))
    return records
