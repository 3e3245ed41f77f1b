"""Subject and prompt fidelity scores of generated images, as defined in the DreamBooth paper.

- DINO: mean cosine similarity between a generated image's ViT-S/16 DINO embedding (the CLS token)
  and each real subject photo's. The metric that best tracks people's judgement of "is this my dog".
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: cosine similarity between the prompt's CLIP text embedding and the image's.

The paper reports DINO 0.668, CLIP-I 0.803, CLIP-T 0.305 for DreamBooth on Stable Diffusion. A
DINO gap of ~0.1 or a CLIP-T gap of ~0.05 is large in human terms.

Pass prompts *without* the rare identifier to CLIP-T ("a photo of dog on the beach"): the
identifier means nothing to the base CLIP model. :func:`strip_identifier` does that.

Preprocessing is done here with Pillow and numpy (resize the shorter side with bicubic, centre
crop, normalize), the same recipe as the reference processors, so torchvision is not needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

from worker.engine.errors import EngineInputError
from worker.engine.models import tiny_tokenizer
from worker.engine.progress import CancelCheck, Progress, ProgressCallback, check_cancel

DINO_ID = "facebook/dino-vits16"
CLIP_ID = "openai/clip-vit-large-patch14"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# How the combined score weighs the three metrics when ranking a job's samples: subject likeness
# (DINO, then CLIP-I) first, prompt fidelity second.
RANK_WEIGHTS = {"dino": 0.5, "clip_i": 0.25, "clip_t": 0.25}
BATCH = 16


@dataclass(frozen=True)
class Scores:
    """The three DreamBooth metrics of one generated image."""

    dino: float
    clip_i: float
    clip_t: float

    @property
    def combined(self) -> float:
        """The weighted sum used to rank samples (see ``RANK_WEIGHTS``)."""
        return (RANK_WEIGHTS["dino"] * self.dino + RANK_WEIGHTS["clip_i"] * self.clip_i
                + RANK_WEIGHTS["clip_t"] * self.clip_t)


def preprocess(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic), centre crop ``size`` x ``size``, normalize; NCHW float."""
    arrays = []
    for image in images:
        rgb = image.convert("RGB")
        width, height = rgb.size
        scale = size / min(width, height)
        resized = rgb.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                             Image.Resampling.BICUBIC)
        left = (resized.width - size) // 2
        top = (resized.height - size) // 2
        cropped = resized.crop((left, top, left + size, top + size))
        pixels = np.asarray(cropped, dtype=np.float32) / 255.0
        arrays.append((pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _features(output: Any) -> torch.Tensor:
    """CLIP ``get_*_features`` return a tensor in transformers 4 and an output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _side(image_size: Any) -> int:
    """An encoder's input side from its config (an int, or a (height, width) pair of equal sides)."""
    return int(image_size[0]) if isinstance(image_size, list | tuple) else int(image_size)


def _normalize(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def strip_identifier(prompt: str, identifier: str) -> str:
    """``prompt`` without the identifier word, for CLIP-T ("a photo of xqz dog" → "a photo of dog")."""
    return " ".join(word for word in prompt.split() if word.strip(",.").lower() != identifier.lower())


def _open(paths: Sequence[Path], role: str) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise EngineInputError(f"{role} image {path} is unreadable: {exc}") from exc
    return images


class Scorer:
    """DINO and CLIP encoders and the scoring of generated images against real subject photos."""

    def __init__(self, dino: ViTModel, clip: CLIPModel, tokenizer: CLIPTokenizer, *,
                 device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        # Typed loosely: transformers' decorated ``to``/config attributes confuse mypy.
        self.dino = cast(Any, dino)
        self.clip = cast(Any, clip)
        for encoder in (self.dino, self.clip):
            encoder.to(self.device)
            encoder.eval()
            encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.dino_size = _side(self.dino.config.image_size)
        self.clip_size = _side(self.clip.config.vision_config.image_size)

    @classmethod
    def from_pretrained(cls, dino_id: str = DINO_ID, clip_id: str = CLIP_ID, *,
                        device: torch.device | None = None, cache_dir: str | None = None) -> Scorer:
        """Real encoders by hub id or local folder; raises :class:`EngineInputError` when they cannot be loaded."""
        try:
            dino = ViTModel.from_pretrained(dino_id, add_pooling_layer=False, cache_dir=cache_dir)
            clip = CLIPModel.from_pretrained(clip_id, cache_dir=cache_dir)
            tokenizer = CLIPTokenizer.from_pretrained(clip_id, cache_dir=cache_dir)
        except (OSError, ValueError) as exc:
            raise EngineInputError(f"could not load the scoring models {dino_id!r} and {clip_id!r}: {exc}") from exc
        return cls(dino, clip, tokenizer, device=device)

    @classmethod
    def random(cls, seed: int = 0, *, image_size: int = 32) -> Scorer:
        """Small encoders with seeded random weights (tests and the CPU demo): right shapes, meaningless values."""
        tokenizer = tiny_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dino = ViTModel(ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64), add_pooling_layer=False)
            clip = CLIPModel(CLIPConfig(
                text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                             "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                             "pad_token_id": tokenizer.pad_token_id},
                vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32,
                               "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
                projection_dim=16,
            ))
        return cls(dino, clip, tokenizer)

    @torch.no_grad()
    def dino_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalized DINO CLS embeddings, one row per image."""
        rows = []
        for start in range(0, len(images), BATCH):
            pixels = preprocess(images[start : start + BATCH], self.dino_size, IMAGENET_MEAN, IMAGENET_STD)
            rows.append(self.dino(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0])
        return _normalize(torch.cat(rows))

    @torch.no_grad()
    def clip_image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalized CLIP image embeddings, one row per image."""
        rows = []
        for start in range(0, len(images), BATCH):
            pixels = preprocess(images[start : start + BATCH], self.clip_size, CLIP_MEAN, CLIP_STD)
            rows.append(_features(self.clip.get_image_features(pixel_values=pixels.to(self.device))))
        return _normalize(torch.cat(rows))

    @torch.no_grad()
    def clip_text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalized CLIP text embeddings, one row per prompt."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        output = self.clip.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                             attention_mask=tokens.attention_mask.to(self.device))
        return _normalize(_features(output))

    def score(self, generated: Sequence[Path], references: Sequence[Path], prompts: Sequence[str], *,
              progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None) -> list[Scores]:
        """DINO, CLIP-I (each against every reference photo, averaged) and CLIP-T, per generated image.

        ``prompts`` is aligned with ``generated``. Raises :class:`EngineInputError` when the lists
        are empty or misaligned, or an image cannot be read.
        """
        if not generated:
            return []
        if not references:
            raise EngineInputError("no reference photos to score against")
        if len(prompts) != len(generated):
            raise EngineInputError(f"{len(prompts)} prompts for {len(generated)} generated images: give one each")
        total = len(generated)
        if progress:
            progress(Progress(stage="scoring", step=0, total=total))
        reference_images = _open(references, "reference")
        reference_dino = self.dino_embeddings(reference_images)
        reference_clip = self.clip_image_embeddings(reference_images)
        results: list[Scores] = []
        for start in range(0, total, BATCH):
            check_cancel(should_cancel)
            images = _open(generated[start : start + BATCH], "generated")
            dino = (self.dino_embeddings(images) @ reference_dino.T).mean(dim=1)
            clip_image = self.clip_image_embeddings(images)
            clip_i = (clip_image @ reference_clip.T).mean(dim=1)
            clip_t = (clip_image * self.clip_text_embeddings(prompts[start : start + BATCH])).sum(dim=1)
            results.extend(Scores(float(d), float(i), float(t))
                           for d, i, t in zip(dino.tolist(), clip_i.tolist(), clip_t.tolist(), strict=True))
            if progress:
                progress(Progress(stage="scoring", step=len(results), total=total))
        return results


def rank(scores: Sequence[Scores]) -> list[int]:
    """Indices of ``scores`` from the best combined score to the worst; ties keep generation order."""
    return sorted(range(len(scores)), key=lambda index: (-round(scores[index].combined, 9), index))


def mean_scores(scores: Sequence[Scores]) -> Scores | None:
    """The average of each metric (how the paper reports a method), or None for no scores."""
    if not scores:
        return None
    return Scores(
        dino=float(np.mean([s.dino for s in scores])),
        clip_i=float(np.mean([s.clip_i for s in scores])),
        clip_t=float(np.mean([s.clip_t for s in scores])),
    )


@lru_cache(maxsize=1)
def default_scorer() -> Scorer | None:
    """The paper's encoders (DINO ViT-S/16, CLIP ViT-L/14) by hub id, loaded once per process; None,
    with a warning, where this machine cannot have them (offline, no cache): the gallery then keeps
    its order instead of a likeness ranking."""
    try:
        return Scorer.from_pretrained()
    except EngineInputError as error:
        logging.getLogger(__name__).warning("samples will not be scored: %s", error)
        return None
