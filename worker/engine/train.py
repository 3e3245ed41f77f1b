"""DreamBooth fine-tuning with prior preservation: LoRA or full, resumable, reproducible.

One optimizer step sees ``batch_size`` instance examples ("a photo of [V] dog" over the subject's
photos) and, with prior preservation, as many class examples ("a photo of dog" over the frozen
base model's own samples) in the same batch. The prediction is split in two and
``loss = mse(instance) + λ · mse(prior)``.

Bank-free preservation (``prior_source="base_model"``): instead of class images, the class half of
each batch is a copy of the instance examples' noisy latents under the class prompt ("a photo of
[V] dog" → "a photo of a dog"), and its target is the frozen base model's own prediction there
(for LoRA: the same denoiser with its adapters switched off). It keeps what the model does for the
class prompt where the subject is being learned, and needs no class images at all.

What makes it cheap: VAE latents are encoded once (the distribution's mean and std are kept and
a latent is *sampled* each step, as the uncached loop would), a horizontally flipped copy is
encoded alongside, text embeddings are computed once while the text encoder is frozen, and the
VAE and frozen text encoder then leave the GPU. On CUDA the step runs under bf16 (or fp16)
autocast while every trainable weight stays fp32.

What makes it safe: all randomness comes from generators seeded from ``config.seed`` (the same
config gives the same loss curve), checkpoints are written to a temporary folder, marked
complete and renamed into place, a run folder with a complete checkpoint resumes from it, a
non-finite loss stops the run with :class:`TrainingDiverged`, and non-finite weights are never
written.

Layout of ``run_dir`` after a run: see :mod:`worker.engine.weights`; plus ``run.json``,
``previews/step-<N>-<i>.png`` and, while training, ``checkpoints/step-<N>/``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from worker.engine.errors import EngineInputError, TrainingDiverged
from worker.engine.families.base import Conditioning, ImageMeta, NoisyBatch
from worker.engine.families.objectives import min_snr_weights
from worker.engine.models import BaseModel
from worker.engine.progress import CancelCheck, Progress, ProgressCallback, Throttle, check_cancel, eta
from worker.engine.quantize import QUANTIZATIONS, quantize_frozen_linears
from worker.engine.weights import (
    LORA_WEIGHTS_FILE,
    RUN_FILE,
    move,
)

__all__ = ["CHECKPOINT_MARKER", "LossParts", "TrainConfig", "TrainResult", "denoising_loss", "dreambooth_loss",
           "latest_checkpoint", "load_training_image", "min_snr_weights", "train"]

STAGE = "training"
CHECKPOINTS_DIR = "checkpoints"
PREVIEWS_DIR = "previews"
# Written last into a checkpoint folder; its presence is what makes the checkpoint complete.
CHECKPOINT_MARKER = "training_state.pt"
CHECKPOINT_WEIGHTS = "trainable.safetensors"
KEEP_CHECKPOINTS = 2
# Losses stay on the device and are read back in groups: reading one every step would make the
# CPU wait for the GPU each step. A divergence is therefore noticed at most this many steps late,
# and always before anything is written.
LOSS_READBACK_INTERVAL = 10
# Fields that change speed, memory or reporting but not the weights a run produces; a run may
# resume from a checkpoint written under different values of these. The frozen base's int8 copy
# (quantize_base) trains the same adapters, within its rounding (tests/worker/engine/test_quantize.py),
# and the worker picks it by the card's memory: a job retried on another card must resume.
RESUME_NEUTRAL_FIELDS = frozenset({
    "checkpoint_every", "preview_every", "preview_prompts", "preview_seed", "preview_steps",
    "gradient_checkpointing", "cache_latents", "num_class_images", "quantize_base",
})


@dataclass
class TrainConfig:
    """Everything that decides a training run. :func:`worker.engine.recipes.recipe` makes good ones.

    ``num_class_images`` is not used by :func:`train` (which trains on the class images it is
    given); it is the recommended size of the class-prior set for the caller to generate.
    """

    method: Literal["lora", "full"] = "lora"
    steps: int = 400
    learning_rate: float = 1e-4
    rank: int = 16  # LoRA rank; alpha defaults to rank
    lora_alpha: int | None = None
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # None: learning_rate
    with_prior: bool = True
    # Where the prior term's targets come from: "bank", the class-prior images (classic DreamBooth);
    # "base_model", the frozen base model's own prediction for the class prompt on the same noisy
    # latents as the instance examples (no class images needed).
    prior_source: Literal["bank", "base_model"] = "bank"
    prior_loss_weight: float = 1.0  # lambda
    batch_size: int = 1  # instance examples per step (plus as many class examples with prior)
    resolution: int = 512
    seed: int = 0
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    # "int8": the frozen linear layers of the denoiser are stored as int8 during a LoRA run (half the
    # memory of bf16; worker.engine.quantize). The saved adapters load onto the full-precision base.
    quantize_base: Literal["none", "int8"] = "none"
    cache_latents: bool = True
    checkpoint_every: int = 0  # 0 = none
    preview_every: int = 0  # 0 = none
    preview_prompts: list[str] = field(default_factory=list)
    preview_seed: int = 1234
    preview_steps: int = 20
    weight_decay: float = 1e-2
    random_flip: bool = True  # train on horizontally flipped copies of the images half the time
    num_class_images: int = 200  # recommended size of the class-prior set (see the class docstring)

    def validate(self) -> None:
        """Raise :class:`EngineInputError` naming the first field with an unusable value."""
        _expect(self.method in ("lora", "full"), "method", self.method, "'lora' or 'full'")
        _expect(self.prior_source in ("bank", "base_model"), "prior_source", self.prior_source,
                "'bank' or 'base_model'")
        _expect(self.quantize_base in QUANTIZATIONS, "quantize_base", self.quantize_base, "'none' or 'int8'")
        if self.quantize_base != "none" and self.method != "lora":
            raise EngineInputError(f"quantize_base={self.quantize_base!r} needs method='lora': a full fine-tune "
                                   "trains the base weights themselves")
        for name in ("train_text_encoder", "with_prior", "gradient_checkpointing", "use_8bit_adam",
                     "cache_latents", "random_flip"):
            _expect(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        for name, minimum in (("steps", 1), ("rank", 1), ("batch_size", 1), ("resolution", 8),
                              ("preview_steps", 1), ("seed", 0), ("preview_seed", 0), ("lr_warmup_steps", 0),
                              ("checkpoint_every", 0), ("preview_every", 0), ("num_class_images", 0)):
            value = getattr(self, name)
            _expect(_is_int(value) and value >= minimum, name, value, f"an integer >= {minimum}")
        _expect(self.resolution % 8 == 0, "resolution", self.resolution, "a multiple of 8")
        _expect(_is_positive_number(self.learning_rate), "learning_rate", self.learning_rate, "a number > 0")
        for name in ("lora_alpha", "text_encoder_lr", "min_snr_gamma"):
            value = getattr(self, name)
            _expect(value is None or _is_positive_number(value), name, value, "None or a number > 0")
        for name in ("prior_loss_weight", "offset_noise", "max_grad_norm", "weight_decay"):
            value = getattr(self, name)
            _expect(_is_number(value) and value >= 0, name, value, "a number >= 0")
        _expect(isinstance(self.preview_prompts, list) and all(isinstance(p, str) and p.strip()
                                                               for p in self.preview_prompts),
                "preview_prompts", self.preview_prompts, "a list of non-empty strings")
        if self.preview_every and not self.preview_prompts:
            raise EngineInputError("preview_every is set but preview_prompts is empty: give prompts or set it to 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config saved by :meth:`to_dict`; unknown keys raise :class:`EngineInputError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise EngineInputError(f"unknown training setting(s): {', '.join(unknown)}")
        config = cls(**values)
        config.validate()
        return config


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_number(value: object) -> bool:
    return _is_number(value) and float(value) > 0  # type: ignore[arg-type]


def _expect(condition: bool, name: str, value: object, wanted: str) -> None:
    if not condition:
        raise EngineInputError(f"training setting {name}={value!r} is invalid: it must be {wanted}")


@dataclass
class TrainResult:
    """What a finished run produced. ``resumed_from`` is the checkpoint step it continued from, if any."""

    run_dir: Path
    final_step: int
    loss_history: list[float]
    steps_per_second: float  # optimizer steps per second of this call's training loop
    peak_memory_mb: float  # CUDA: peak allocated; CPU: the process's peak resident set
    seconds: float  # wall time of this call
    resumed_from: int | None


# --------------------------------------------------------------------------------------------
# The loss


@dataclass
class LossParts:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, *, with_prior: bool,
                    prior_loss_weight: float = 1.0, weights: torch.Tensor | None = None) -> LossParts:
    """The DreamBooth loss of one batch, in fp32.

    With prior preservation the first half of the batch holds the instance examples and the
    second half the class examples; ``loss = mse(instance) + prior_loss_weight · mse(prior)``.
    ``weights`` are per-example loss weights (Min-SNR: each computed from *that example's*
    timestep), so the instance half is weighted by the instance timesteps and the prior half by
    the class timesteps. (The public trainers weight the instance loss of B rows by all 2B
    timesteps: wrong at B = 1, a shape error at B > 1.)
    """
    if prediction.shape != target.shape or (weights is not None and weights.shape != prediction.shape[:1]):
        raise ValueError(f"prediction {tuple(prediction.shape)}, target {tuple(target.shape)} and weights "
                         f"{None if weights is None else tuple(weights.shape)} disagree on the batch")
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=tuple(range(1, prediction.ndim)))
    if weights is not None:
        per_example = per_example * weights
    if not with_prior:
        instance = per_example.mean()
        return LossParts(total=instance, instance=instance, prior=None)
    if per_example.shape[0] % 2:
        raise ValueError(f"a prior-preservation batch has an even size, not {per_example.shape[0]}")
    instance_rows, prior_rows = per_example.chunk(2)
    instance, prior = instance_rows.mean(), prior_rows.mean()
    return LossParts(total=instance + prior_loss_weight * prior, instance=instance, prior=prior)


# --------------------------------------------------------------------------------------------
# Images, latents, prompts


def load_training_image(path: Path, resolution: int) -> torch.Tensor:
    """An RGB photo as a ``[3, resolution, resolution]`` tensor in [-1, 1]: short side resized, centre cropped."""
    return _load_cropped(path, resolution)[0]


def _load_cropped(path: Path, resolution: int) -> tuple[torch.Tensor, tuple[int, int, int, int, int]]:
    """:func:`load_training_image` and where the crop came from: (original height, original width,
    crop top, crop left, crop left of the mirrored photo), in pixels of the resized photo (what SDXL
    is conditioned on)."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except FileNotFoundError:
        raise EngineInputError(f"training image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise EngineInputError(f"training image {path} cannot be read: {exc}") from exc
    width, height = image.size
    scale = resolution / min(width, height)
    resized = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))),
                           Image.Resampling.BICUBIC)
    left = (resized.width - resolution) // 2
    top = (resized.height - resolution) // 2
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8)
    # contiguous(): the permuted view is channels-last in memory, which would carry through the
    # VAE into the cached latents and the UNet and send the CPU convolutions down a slow path.
    tensor = pixels.view(resolution, resolution, 3).permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous()
    return tensor, (height, width, top, left, resized.width - resolution - left)


@dataclass
class _Images:
    """Training images as pixels, with each image's crop record (see :func:`_load_cropped`)."""

    pixels: torch.Tensor  # [N, 3, R, R]
    crops: torch.Tensor  # [N, 5]


class _LatentSource:
    """Latent distributions (mean, std) of a set of images and their mirror images, with crop records.

    Cached: encoded once, kept on the training device. Uncached: the pixels are kept and encoded
    through the VAE at every request, which is what the diffusers DreamBooth scripts do. Both
    return the same (mean, std), so both modes sample the same latents from the same generator.
    """

    def __init__(self, images: _Images, model: BaseModel, device: torch.device, autocast: Any, cached: bool,
                 with_flips: bool) -> None:
        self.model = model
        self.device = device
        self.autocast = autocast
        self.cached = cached
        pixels = images.pixels
        self.count = pixels.shape[0]
        variants = [pixels, pixels.flip(-1)] if with_flips else [pixels]
        # Crop records per variant, (original h, original w, top, left): a mirror image's crop has
        # the mirrored left edge.
        crops = images.crops.float()
        self.crops = torch.stack([crops[:, :4], crops[:, [0, 1, 2, 4]]][: len(variants)]).to(device)
        if cached:
            encoded = [self._encode(v) for v in variants]
            self.means = torch.stack([e[0] for e in encoded])  # [variant, image, C, h, w]
            self.stds = torch.stack([e[1] for e in encoded])
        else:
            self.pixels = torch.stack(variants).to(device)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for start in range(0, pixels.shape[0], chunk):
            batch = pixels[start:start + chunk].to(self.device)
            with self.autocast():
                mean, std = self.model.family.latent_distribution(self.model.vae, batch)
            means.append(mean.float())
            stds.append(std.float())
        return torch.cat(means), torch.cat(stds)

    def distribution(self, indices: torch.Tensor, flips: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, std and crop record of the chosen images (mirrored where ``flips`` says)."""
        variant = flips.long().to(self.device)
        index = indices.to(self.device)
        crops = self.crops[variant, index]
        if self.cached:
            return self.means[variant, index], self.stds[variant, index], crops
        mean, std = self._encode(self.pixels[variant, index])
        return mean, std, crops


class _EpochOrder:
    """Which images (and whether mirrored) fill each step: a fresh shuffle every pass over the set.

    The order is a pure function of (seed, step), so a resumed run sees exactly the batches the
    uninterrupted run would have seen, with nothing to save.
    """

    def __init__(self, count: int, seed: int, salt: int, flip: bool) -> None:
        self.count, self.seed, self.salt, self.flip = count, seed, salt, flip
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)
        self._flips = torch.empty(0, dtype=torch.bool)

    def _shuffle(self, epoch: int) -> None:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.salt * 7_919 + epoch)
            self._order = torch.randperm(self.count, generator=generator)
            coins = torch.rand(self.count, generator=generator) < 0.5
            self._flips = coins if self.flip else torch.zeros_like(coins)
            self._epoch = epoch

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and mirror flags of the ``size`` examples of optimizer step ``step`` (0-based)."""
        indices, flips = [], []
        for position in range(step * size, (step + 1) * size):
            self._shuffle(position // self.count)
            slot = position % self.count
            indices.append(int(self._order[slot]))
            flips.append(bool(self._flips[slot]))
        return torch.tensor(indices), torch.tensor(flips)


def _load_images(paths: Sequence[Path], resolution: int, role: str) -> _Images:
    if not paths:
        raise EngineInputError(f"{role} is empty: training needs at least one image")
    loaded = [_load_cropped(Path(p), resolution) for p in paths]
    return _Images(pixels=torch.stack([tensor for tensor, _ in loaded]),
                   crops=torch.tensor([list(crop) for _, crop in loaded], dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# Models: what is trained, on which device, in which precision


@dataclass
class _Trainables:
    """The trainable copies of a run: the denoiser, and the text encoders when they are trained."""

    modules: dict[str, torch.nn.Module]  # component name → trainable copy, denoiser first
    loras: dict[str, LoraConfig]  # component name → its adapter's config (LoRA runs)
    parameters: dict[str, torch.nn.Parameter]  # "<component>.<name>" → trainable parameter, in optimizer order


def _prepare_trainables(model: BaseModel, config: TrainConfig, device: torch.device,
                        frozen_dtype: torch.dtype) -> _Trainables:
    """Copies of the modules to train, so the shared base model is never modified.

    LoRA: the frozen weights may sit in the autocast dtype (half the memory); the adapters are fp32.
    Full: everything trained is fp32, autocast makes the matmuls cheap. Never fp16 trainable weights.
    """
    family = model.family
    alpha = config.lora_alpha or config.rank
    keys = [family.denoiser_key] + (list(family.text_encoder_keys) if config.train_text_encoder else [])
    modules: dict[str, torch.nn.Module] = {}
    for key in keys:
        module = copy.deepcopy(model.modules[key])
        move(module, "cpu", torch.float32)
        modules[key] = module
    loras: dict[str, LoraConfig] = {}
    if config.method == "lora":
        for key in keys:
            targets = family.denoiser_lora_targets if key == family.denoiser_key else family.text_encoder_lora_targets
            loras[key] = LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=list(targets))
        # The adapters are initialised on the CPU from the run's seed, never from global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for key, lora in loras.items():
                inject_adapter_in_model(lora, modules[key])
        if config.quantize_base == "int8":  # from the fp32 copy, before the cast below
            quantize_frozen_linears(modules[family.denoiser_key])
        for module in modules.values():
            # Cast the frozen weights while still on the CPU: half the bytes to move.
            for parameter in module.parameters():
                if not parameter.requires_grad:
                    parameter.data = parameter.data.to(frozen_dtype)
            move(module, device)
    else:
        for module in modules.values():
            move(module, device)
            module.requires_grad_(True)
    parameters: dict[str, torch.nn.Parameter] = {}
    for key, module in modules.items():
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                parameters[f"{key}.{name}"] = parameter
        module.train()
    if config.gradient_checkpointing:
        for key, module in modules.items():
            runner: Any = module
            if key == family.denoiser_key:
                runner.enable_gradient_checkpointing()
                continue
            # Non-reentrant checkpointing: the reentrant kind drops the gradients of adapters
            # inside a checkpointed block whose inputs (frozen embeddings) need no gradient.
            enable = getattr(runner, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers 5
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                runner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _Trainables(modules, loras, parameters)


def _make_optimizer(config: TrainConfig, trainables: _Trainables, denoiser_key: str,
                    device: torch.device) -> torch.optim.Optimizer:
    denoiser_params = [p for n, p in trainables.parameters.items() if n.startswith(f"{denoiser_key}.")]
    text_params = [p for n, p in trainables.parameters.items() if not n.startswith(f"{denoiser_key}.")]
    groups: list[dict[str, Any]] = [{"params": denoiser_params, "lr": config.learning_rate}]
    if text_params:
        groups.append({"params": text_params, "lr": config.text_encoder_lr or config.learning_rate})
    if config.use_8bit_adam:
        if device.type != "cuda":
            raise EngineInputError("use_8bit_adam needs a CUDA GPU; set use_8bit_adam=False on the CPU")
        try:
            import bitsandbytes  # type: ignore[import-not-found]
        except ImportError:
            raise EngineInputError(
                "use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes, or set use_8bit_adam=False"
            ) from None
        optimizer: torch.optim.Optimizer = bitsandbytes.optim.AdamW8bit(groups, weight_decay=config.weight_decay)
        return optimizer
    # fused AdamW is one kernel per step on CUDA instead of several per parameter.
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=device.type == "cuda")


def _warmup_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = config.lr_warmup_steps

    def factor(step: int) -> float:
        return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextmanager
def _adapters_off(module: torch.nn.Module) -> Iterator[None]:
    """Switch every LoRA layer of ``module`` off for the block (the frozen base model); nothing for a module
    without adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextmanager
def _on_device(modules: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the block, then back to where each one was."""
    homes = [next(m.parameters()).device for m in modules]
    for module in modules:
        move(module, device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes, strict=True):
            move(module, home)


# --------------------------------------------------------------------------------------------
# Checkpoints


def _resume_key(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in RESUME_NEUTRAL_FIELDS}


def _first_non_finite(parameters: dict[str, torch.nn.Parameter]) -> str | None:
    """The name of the first parameter holding a NaN or infinity, or None."""
    for name, parameter in parameters.items():
        if not bool(torch.isfinite(parameter.detach()).all()):
            return name
    return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of ``run_dir``; removes unfinished (``.tmp-*``) ones."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    complete: list[tuple[int, Path]] = []
    for entry in folder.iterdir():
        if entry.name.startswith(".tmp-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith("step-") and (entry / CHECKPOINT_MARKER).is_file():
            try:
                complete.append((int(entry.name.removeprefix("step-")), entry))
            except ValueError:
                continue
    return max(complete)[1] if complete else None


def _save_checkpoint(run_dir: Path, step: int, trainables: _Trainables, state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically: temporary folder, marker last, rename."""
    folder = run_dir / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".tmp-{step}"
    final = folder / f"step-{step}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        weights = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in trainables.parameters.items()}
        save_file(weights, str(temporary / CHECKPOINT_WEIGHTS))
        torch.save(state, temporary / CHECKPOINT_MARKER)
        _fsync_file(temporary / CHECKPOINT_WEIGHTS)
        _fsync_file(temporary / CHECKPOINT_MARKER)
        if final.exists():  # re-reached after resuming from an older checkpoint
            shutil.rmtree(final)
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    older = sorted((int(p.name.removeprefix("step-")), p) for p in folder.glob("step-*") if p != final
                   and p.name.removeprefix("step-").isdigit())
    for _, path in older[: max(0, len(older) - (KEEP_CHECKPOINTS - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, trainables: _Trainables, config: TrainConfig) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path / CHECKPOINT_MARKER, map_location="cpu", weights_only=True)
    saved_key = state.get("resume_key", {})
    differing = sorted(k for k in set(saved_key) | set(_resume_key(config))
                       if saved_key.get(k) != _resume_key(config).get(k))
    if differing:
        raise EngineInputError(
            f"the checkpoint {path} was written with different training settings ({', '.join(differing)}); "
            f"delete {path.parent} to start over"
        )
    weights = load_file(str(path / CHECKPOINT_WEIGHTS))
    if set(weights) != set(trainables.parameters):
        raise EngineInputError(f"the checkpoint {path} does not match the model being trained; delete it to start over")
    with torch.no_grad():
        for name, parameter in trainables.parameters.items():
            parameter.copy_(weights[name])
    return state


# --------------------------------------------------------------------------------------------
# Outputs


def _save_outputs(run_dir: Path, model: BaseModel, trainables: _Trainables) -> list[str]:
    """Write the trained weights (only what was trained); returns the names written."""
    family = model.family
    if trainables.loras:
        layers = {key: convert_state_dict_to_diffusers(get_peft_model_state_dict(trainables.modules[key]))
                  for key in trainables.loras}
        staging = run_dir / ".lora-staging"
        shutil.rmtree(staging, ignore_errors=True)
        on_cpu = {key: {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
                  for key, state in layers.items()}
        family.save_lora(staging, on_cpu, {key: _lora_metadata(lora) for key, lora in trainables.loras.items()})
        (staging / LORA_WEIGHTS_FILE).replace(run_dir / LORA_WEIGHTS_FILE)
        shutil.rmtree(staging, ignore_errors=True)
        written = [LORA_WEIGHTS_FILE]
        exported = family.export_tool_lora(run_dir)
        if exported is not None:
            written.append(exported.name)
        return written
    written = []
    for name, module in trainables.modules.items():
        runner: Any = module
        staging = run_dir / f".{name}-staging"
        shutil.rmtree(staging, ignore_errors=True)
        runner.save_pretrained(str(staging), safe_serialization=True)
        shutil.rmtree(run_dir / name, ignore_errors=True)
        os.rename(staging, run_dir / name)
        written.append(name)
    return written


def _lora_metadata(config: LoraConfig) -> dict[str, Any]:
    """The adapter settings diffusers reads back from the file header (needed whenever alpha ≠ rank)."""
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules or [])}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload, indent=2, default=str))
    partial.replace(path)


def _finished_result(run_dir: Path, config: TrainConfig) -> TrainResult | None:
    """The result of an earlier call that finished this same run, so a repeated call is a no-op."""
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not record.get("complete") or record.get("config") != config.to_dict():
        return None
    if not all((run_dir / name).exists() for name in record.get("outputs", [])):
        return None  # the weights were removed since: train again
    timings = record.get("timings", {})
    return TrainResult(run_dir=run_dir, final_step=int(record["final_step"]),
                       loss_history=[float(v) for v in record["loss_history"]],
                       steps_per_second=float(timings.get("steps_per_second", 0.0)),
                       peak_memory_mb=float(timings.get("peak_memory_mb", 0.0)),
                       seconds=float(timings.get("seconds", 0.0)), resumed_from=record.get("resumed_from"))


# --------------------------------------------------------------------------------------------
# The loop


class _Run:
    """One :func:`train` call: the modules, optimizer and data of the run, and its loop."""

    def __init__(self, model: BaseModel, config: TrainConfig, run_dir: Path, progress: ProgressCallback | None,
                 should_cancel: CancelCheck | None) -> None:
        self.model, self.config, self.run_dir = model, config, run_dir
        self.family = model.family
        self.device = model.device
        self.on_cuda = self.device.type == "cuda"
        self.amp_dtype = model.dtype if self.on_cuda and model.dtype in (torch.bfloat16, torch.float16) else None
        self.emit = Throttle(progress)
        self.should_cancel = should_cancel
        self.objective = self.family.objective(model, self.device, min_snr_gamma=config.min_snr_gamma,
                                               offset_noise=config.offset_noise)
        self.loss_history: list[float] = []
        self.pending_losses: list[torch.Tensor] = []  # on the device, not yet read back
        self.start_step = 0

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # Setup ------------------------------------------------------------------------------------

    def prepare(self, instance: _Images, classes: _Images | None, instance_prompt: str, class_prompt: str) -> None:
        """Trainable copies, optimizer, generator, cached prompts and latents, batch order."""
        config, device, model = self.config, self.device, self.model
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        # Frozen base components leave the GPU; only what is needed goes (back) on it below.
        move(model.denoiser, "cpu")
        self.trainables = _prepare_trainables(model, config, device, self.amp_dtype or torch.float32)
        self.optimizer = _make_optimizer(config, self.trainables, self.family.denoiser_key, device)
        self.lr_schedule = _warmup_schedule(config, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.generator = torch.Generator(device=device).manual_seed(config.seed)

        # Prompts: encoded once while the text encoders are frozen (then they leave the device),
        # every step while they are trained.
        base_model_prior = config.with_prior and config.prior_source == "base_model"
        self.prompts = [instance_prompt] + ([class_prompt] if classes is not None or base_model_prior else [])
        self.cached_conditioning: Conditioning | None = None
        frozen_prompts = list(self.prompts) if not any(
            key in self.trainables.modules for key in self.family.text_encoder_keys) else []
        if base_model_prior and not frozen_prompts:
            frozen_prompts = [class_prompt]  # the base model's targets need the base encoders' class prompt
        frozen: Conditioning = {}
        if frozen_prompts:
            encoders = [model.modules[key] for key in self.family.text_encoder_keys]
            with _on_device(encoders, device), torch.no_grad():
                # One prompt per call: the same numbers as encoding a prompt alone, whatever the batch.
                encoded = [self.family.encode_prompts(model, model.modules, [p]) for p in frozen_prompts]
            frozen = {key: torch.cat([e[key] for e in encoded]).float() for key in encoded[0]}
            if frozen_prompts == self.prompts:
                self.cached_conditioning = frozen
        # Bank-free preservation: the frozen base model, and its class-prompt conditioning.
        self.reference: torch.nn.Module | None = None
        if base_model_prior:
            self.reference_conditioning = {key: value[-1:] for key, value in frozen.items()}
            if config.method == "lora":
                self.reference = self.trainables.modules[self.family.denoiser_key]  # with its adapters off
            else:
                self.reference = model.denoiser
                move(self.reference, device)

        # Latents: the VAE stays on the device only when it must encode every step.
        move(model.vae, device)
        self.instance_latents = _LatentSource(instance, model, device, self.autocast, config.cache_latents,
                                              config.random_flip)
        self.class_latents = (_LatentSource(classes, model, device, self.autocast, config.cache_latents,
                                            config.random_flip) if classes is not None else None)
        if config.cache_latents:
            move(model.vae, "cpu")
        self.instance_order = _EpochOrder(instance.pixels.shape[0], config.seed, 1, config.random_flip)
        self.class_order = (_EpochOrder(classes.pixels.shape[0], config.seed, 2, config.random_flip)
                            if classes is not None else None)

    def resume(self) -> int | None:
        """Continue from the newest complete checkpoint, if any; returns its step."""
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return None
        state = _load_checkpoint(checkpoint, self.trainables, self.config)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.loss_history = list(state["loss_history"])
        self.start_step = int(state["step"])
        return self.start_step

    # The loop ---------------------------------------------------------------------------------

    def run_loop(self) -> float:
        """Train from ``start_step`` to ``config.steps`` with events, checkpoints and previews; returns seconds."""
        config = self.config
        started = time.monotonic()
        for step in range(self.start_step + 1, config.steps + 1):
            check_cancel(self.should_cancel)
            self.pending_losses.append(self.step(step))
            if not self.on_cuda or len(self.pending_losses) >= LOSS_READBACK_INTERVAL or step == config.steps:
                self.flush_losses(step)
            elapsed, remaining = eta(started, step - self.start_step, config.steps - self.start_step)
            event = Progress(stage=STAGE, step=step, total=config.steps,
                             loss=self.loss_history[-1] if self.loss_history else None,
                             elapsed=elapsed, eta_seconds=remaining)
            self.emit(event)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                path = self.save_checkpoint(step)
                self.emit(replace(event, loss=self.loss_history[-1], checkpoint=path,
                                  message=f"checkpoint at step {step}"), force=True)
            if config.preview_every and step % config.preview_every == 0:
                self.flush_losses(step)
                previews = _write_previews(self, step)
                self.emit(replace(event, loss=self.loss_history[-1], previews=previews,
                                  message=f"previews at step {step}"), force=True)
        self.flush_losses(config.steps)
        return time.monotonic() - started

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step (``step`` counts from 1); returns its loss, still on the device."""
        config, generator = self.config, self.generator
        batch = config.batch_size
        indices, flips = self.instance_order.batch(step - 1, batch)
        means, stds, crops = self.instance_latents.distribution(indices, flips)
        if self.class_order is not None and self.class_latents is not None:
            class_indices, class_flips = self.class_order.batch(step - 1, batch)
            class_means, class_stds, class_crops = self.class_latents.distribution(class_indices, class_flips)
            means, stds = torch.cat([means, class_means]), torch.cat([stds, class_stds])
            crops = torch.cat([crops, class_crops])
        # Sample the latent as the uncached loop would: a fresh draw from the VAE's distribution.
        sampled = means + stds * torch.randn(means.shape, generator=generator, device=self.device)
        noised = self.objective.draw(self.family.to_latents(self.model, sampled), generator)
        if self.reference is not None:
            noised, crops = self.with_base_model_targets(noised, crops, batch), torch.cat([crops, crops])
        with self.autocast():
            prediction = self.family.predict(self.model, self.trainables.modules[self.family.denoiser_key], noised,
                                             self.conditioning(batch), ImageMeta(crops))
        loss = dreambooth_loss(prediction, noised.target, with_prior=config.with_prior,
                               prior_loss_weight=config.prior_loss_weight, weights=noised.weights).total
        parameters = list(self.trainables.parameters.values())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def with_base_model_targets(self, noised: NoisyBatch, crops: torch.Tensor, batch: int) -> NoisyBatch:
        """``noised`` (the instance rows) followed by a class-prompt copy of each row whose target is the
        frozen base model's prediction for the class prompt on that same noisy latent."""
        assert self.reference is not None
        rows = torch.zeros(batch, dtype=torch.long, device=self.device)
        conditioning = {key: value[rows] for key, value in self.reference_conditioning.items()}
        with self.autocast(), _adapters_off(self.reference):
            reference = self.family.predict(self.model, self.reference, noised, conditioning, ImageMeta(crops))
        weights = None if noised.weights is None else torch.cat([noised.weights, noised.weights])
        return NoisyBatch(noisy=torch.cat([noised.noisy, noised.noisy]),
                          timesteps=torch.cat([noised.timesteps, noised.timesteps]),
                          target=torch.cat([noised.target, reference.float()]), weights=weights)

    def conditioning(self, batch: int) -> Conditioning:
        """Prompt conditioning of one batch: ``batch`` instance rows, then ``batch`` class rows with prior."""
        if self.cached_conditioning is not None:
            rows = torch.arange(len(self.prompts), device=self.device).repeat_interleave(batch)
            return {key: value[rows] for key, value in self.cached_conditioning.items()}
        encoders = {**self.model.modules, **self.trainables.modules}
        return self.family.encode_prompts(self.model, encoders, [p for p in self.prompts for _ in range(batch)])

    def flush_losses(self, last_step: int) -> None:
        """Read the pending losses (up to ``last_step``) back; raise :class:`TrainingDiverged` at a non-finite one."""
        if not self.pending_losses:
            return
        first_step = last_step - len(self.pending_losses) + 1
        values = torch.stack(self.pending_losses).float().cpu().tolist()
        self.pending_losses.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"training diverged at step {first_step + offset} (loss {value}); nothing was saved from this "
                    f"run. Lower the learning rate (now {self.config.learning_rate:g}) or the number of steps."
                )
            self.loss_history.append(value)

    def check_weights(self, step: int) -> None:
        """Raise :class:`TrainingDiverged` if any trained weight is NaN or infinite: such weights are never saved."""
        bad = _first_non_finite(self.trainables.parameters)
        if bad is not None:
            raise TrainingDiverged(f"training diverged by step {step} (weight {bad} is not finite); nothing was saved")

    def save_checkpoint(self, step: int) -> Path:
        self.flush_losses(step)
        self.check_weights(step)
        state = {
            "step": step, "resume_key": _resume_key(self.config), "loss_history": list(self.loss_history),
            "generator": self.generator.get_state(), "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_schedule.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler else {},
        }
        return _save_checkpoint(self.run_dir, step, self.trainables, state)


def train(model: BaseModel, config: TrainConfig, *, instance_images: list[Path], instance_prompt: str,
          class_images: list[Path], class_prompt: str, run_dir: Path,
          progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
          run_info: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune ``model`` on the subject's photos and write the trained weights into ``run_dir``.

    ``instance_images`` are the subject's photos (trained under ``instance_prompt``, e.g. "a photo
    of [V] dog"); ``class_images`` the class-prior images (under ``class_prompt``, "a photo of
    dog"), required when ``config.with_prior``. Images are resized on their short side and centre
    cropped to ``config.resolution``.

    If ``run_dir`` holds a complete checkpoint the run continues from it; if it holds the finished
    result of this same config the recorded result is returned without training. The base model's
    weights are never modified; its components may be moved to the CPU.

    Raises :class:`EngineInputError` for bad input, :class:`Cancelled` when ``should_cancel``
    says so (checked every step), :class:`TrainingDiverged` on a non-finite loss.
    """
    started = time.monotonic()
    _check_inputs(model, config, instance_prompt, class_prompt, class_images)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    finished = _finished_result(run_dir, config)
    if finished is not None:
        return finished
    # A record of another run in this folder must not outlive the weights this run replaces.
    (run_dir / RUN_FILE).unlink(missing_ok=True)
    instance = _load_images(instance_images, config.resolution, "instance_images")
    uses_bank = config.with_prior and config.prior_source == "bank"
    classes = _load_images(class_images, config.resolution, "class_images") if uses_bank else None

    run = _Run(model, config, run_dir, progress, should_cancel)
    run.emit(Progress(stage=STAGE, step=0, total=config.steps, message="preparing training"), force=True)
    try:
        run.prepare(instance, classes, instance_prompt, class_prompt)
        resumed_from = run.resume()
        run.emit(Progress(stage=STAGE, step=run.start_step, total=config.steps,
                          message=f"resumed from step {resumed_from}" if resumed_from is not None else "training"),
                 force=True)
        loop_seconds = run.run_loop()
        run.check_weights(config.steps)
        outputs = _save_outputs(run_dir, model, run.trainables)
    finally:
        move(model.vae, "cpu")
        move(model.denoiser, "cpu")  # a full run's bank-free reference may have used it
    steps_done = config.steps - run.start_step
    result = TrainResult(
        run_dir=run_dir, final_step=config.steps, loss_history=list(run.loss_history),
        steps_per_second=steps_done / loop_seconds if loop_seconds > 0 else 0.0,
        peak_memory_mb=_peak_memory_mb(run.device), seconds=time.monotonic() - started, resumed_from=resumed_from,
    )
    _write_json_atomically(run_dir / RUN_FILE, {
        "complete": True,
        "config": config.to_dict(),
        "run_info": run_info or {},
        "base_model": {"spec": model.spec, "fingerprint": model.fingerprint, "family": model.family.name},
        "seed": config.seed,
        "final_step": result.final_step,
        "resumed_from": resumed_from,
        "loss_history": result.loss_history,
        "outputs": outputs,
        "counts": {"instance_images": len(instance_images), "class_images": len(class_images)},
        "device": str(run.device),
        "timings": {"steps_per_second": result.steps_per_second, "peak_memory_mb": result.peak_memory_mb,
                    "seconds": result.seconds, "steps_this_call": steps_done},
    })
    # The run is finished and its outputs are written: checkpoints would only take disk space.
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    run.emit(Progress(stage=STAGE, step=config.steps, total=config.steps,
                      loss=result.loss_history[-1] if result.loss_history else None,
                      elapsed=result.seconds, eta_seconds=0.0, message="training finished"), force=True)
    return result


def _check_inputs(model: BaseModel, config: TrainConfig, instance_prompt: str, class_prompt: str,
                  class_images: list[Path]) -> None:
    config.validate()
    for name, prompt in (("instance_prompt", instance_prompt), ("class_prompt", class_prompt)):
        if not isinstance(prompt, str) or not prompt.strip():
            if name == "class_prompt" and not config.with_prior:
                continue
            raise EngineInputError(f"{name} is empty")
    multiple = model.family.latent_multiple
    if config.resolution % multiple:
        raise EngineInputError(f"training setting resolution={config.resolution} is invalid: it must be a "
                               f"multiple of {multiple} for a {model.family.label} model")
    if config.train_text_encoder and not model.family.text_encoder_lora_targets:
        raise EngineInputError(f"training setting train_text_encoder=True is invalid: a {model.family.label} "
                               "model's text encoder is not trained; set it to False")
    if config.with_prior and config.prior_source == "bank" and not class_images:
        raise EngineInputError("class_images is empty but with_prior is set: give class-prior images, "
                               "set prior_source='base_model' or set with_prior=False")


@torch.no_grad()
def _write_previews(run: _Run, step: int) -> list[Path]:
    """Sample the preview prompts with fixed seeds into ``previews/step-<step>-<i>.png``."""
    config, device, model, trainables = run.config, run.device, run.model, run.trainables
    folder = run.run_dir / PREVIEWS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    movable: list[torch.nn.Module] = [model.vae] + [model.modules[key] for key in model.family.text_encoder_keys
                                                    if key not in trainables.modules]
    pipe = model.pipeline(**trainables.modules)
    paths: list[Path] = []
    for module in trainables.modules.values():
        module.eval()
    try:
        with _on_device(movable, device):
            for index, prompt in enumerate(config.preview_prompts):
                generator = torch.Generator().manual_seed(config.preview_seed + index)
                pixels = model.family.render(pipe, [prompt], negative_prompt="", steps=config.preview_steps,
                                             guidance=model.family.sample_defaults(model)[1],
                                             resolution=config.resolution,
                                             generators=[generator], autocast_dtype=run.amp_dtype)[0]
                path = folder / f"step-{step}-{index}.png"
                Image.fromarray(np.clip(np.round(np.nan_to_num(pixels) * 255.0), 0, 255).astype(np.uint8)).save(path)
                paths.append(path)
    finally:
        for module in trainables.modules.values():
            module.train()
    return paths


@torch.no_grad()
def denoising_loss(model: BaseModel, images: Sequence[Path], prompt: str, *, resolution: int,
                   denoiser: torch.nn.Module | None = None, text_encoders: dict[str, torch.nn.Module] | None = None,
                   seed: int = 0, levels: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> float:
    """Mean denoising loss of ``images`` under ``prompt`` on fixed noise and noise levels (lower: better fit).

    Uses the VAE mean latent (no sampling), the same noise for every call with the same ``seed``
    and the noise ``levels`` (fractions from clean to pure noise), so values before and after
    training, or of two trained models, are comparable. ``denoiser``/``text_encoders`` default to the
    base model's; everything runs on the denoiser's device.
    """
    denoiser = denoiser if denoiser is not None else model.denoiser
    device = next(denoiser.parameters()).device
    losses = [F.mse_loss(prediction.float(), noised.target.float()).item() for noised, prediction in
              _fixed_predictions(model, images, prompt, resolution, denoiser, text_encoders, seed, levels, device)]
    return sum(losses) / len(losses)


@torch.no_grad()
def prediction_drift(model: BaseModel, images: Sequence[Path], prompt: str, *, resolution: int,
                     denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None = None,
                     seed: int = 0, levels: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> float:
    """How far training moved the model for ``prompt``: the mean squared difference between a trained
    ``denoiser``'s (with its ``text_encoders``) and the base model's predictions on the same noised
    latents of ``images`` (fixed noise and levels, as :func:`denoising_loss`). 0: unchanged."""
    device = next(denoiser.parameters()).device
    trained = _fixed_predictions(model, images, prompt, resolution, denoiser, text_encoders, seed, levels, device)
    base = _fixed_predictions(model, images, prompt, resolution, model.denoiser, None, seed, levels, device)
    drifts = [F.mse_loss(ours.float(), theirs.float()).item() for (_, ours), (_, theirs) in zip(trained, base,
                                                                                                  strict=True)]
    return sum(drifts) / len(drifts)


def _fixed_predictions(model: BaseModel, images: Sequence[Path], prompt: str, resolution: int,
                       denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None,
                       seed: int, levels: Sequence[float], device: torch.device
                       ) -> list[tuple[NoisyBatch, torch.Tensor]]:
    """The denoiser's predictions (on ``device``) for ``images`` under ``prompt`` at each noise level, on
    noise from ``seed``."""
    family = model.family
    encoders = {**model.modules, **(text_encoders or {})}
    loaded = _load_images(list(images), resolution, "images")
    with _on_device([model.vae, *(encoders[key] for key in family.text_encoder_keys)], device):
        mean, _ = family.latent_distribution(model.vae, loaded.pixels.to(device))
        latents = family.to_latents(model, mean.float())
        conditioning = family.encode_prompts(model, encoders, [prompt])
    objective = family.objective(model, device, min_snr_gamma=None, offset_noise=0.0)
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = next(denoiser.parameters()).dtype
    rows = torch.zeros(latents.shape[0], dtype=torch.long, device=device)
    batch_conditioning = {key: value[rows].to(dtype) for key, value in conditioning.items()}
    meta = ImageMeta(loaded.crops[:, :4].to(device))
    results = []
    with _on_device([denoiser], device):
        for level in levels:
            noise = torch.randn(latents.shape, generator=generator, device=device)
            noised = objective.at_fraction(latents, noise, level)
            noised.noisy = noised.noisy.to(dtype)
            results.append((noised, family.predict(model, denoiser, noised, batch_conditioning, meta)))
    return results
