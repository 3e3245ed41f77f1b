"""The contract every base-model family implements, and the types the trainer and sampler share.

A *family* is a kind of text-to-image model (SD 1.x/2.x, SDXL, ...). Everything that differs
between families lives behind :class:`Family`; everything that does not (the photos, the prior
bank, the batch that mixes instance and class examples, the split loss, cached latents and
embeddings, checkpoints, resume, progress, previews, exports' file handling) is written once in the
trainer (:mod:`worker.engine.train`), the sampler and :mod:`worker.engine.weights`.

A family says:

- which stock diffusers pipeline it maps to and under which component names its denoiser, VAE,
  text encoders and tokenizers live (``denoiser_key``, ``text_encoder_keys``, ``tokenizer_keys``);
- how it encodes prompts (:meth:`Family.encode_prompts`) into a :data:`Conditioning`, a dict of
  batch-first tensors that the trainer caches while the text encoders are frozen;
- how it turns pixels into the latents its denoiser sees (:meth:`Family.latent_distribution`,
  :meth:`Family.to_latents`);
- its training objective (:meth:`Family.objective`), and how its denoiser is called
  (:meth:`Family.predict`), with any per-image conditioning (SDXL's size and crop ids) taken from
  the :class:`ImageMeta` of the batch;
- its sampler (:meth:`Family.pipeline`, :meth:`Family.render`) with default steps and guidance;
- its LoRA targets, the files its LoRA is saved as, and the tool-specific export's key prefixes;
- the tokenizers its rare-token identifier must stay a single token in.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from worker.engine.models import BaseModel

# Batch-first tensors that condition the denoiser on a prompt (hidden states, pooled vectors, masks).
Conditioning = dict[str, torch.Tensor]


@dataclass
class ImageMeta:
    """Where each training image came from, per row of a batch: ``[B, 4]`` of
    (original height, original width, crop top, crop left), in pixels of the resized photo."""

    rows: torch.Tensor


@dataclass
class NoisyBatch:
    """A batch of noised latents and what the denoiser must predict for it.

    ``timesteps`` are what the denoiser is called with (integer DDPM steps, or flow-matching
    sigmas); ``weights`` are per-example loss weights (Min-SNR and the like), or None for 1.
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None = None


class Objective(Protocol):
    """A training objective: how a clean latent is noised and what the prediction is compared with."""

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        """Noise ``latents`` at random noise levels drawn from ``generator``."""
        ...

    def at_fraction(self, latents: torch.Tensor, noise: torch.Tensor, fraction: float) -> NoisyBatch:
        """Noise ``latents`` with ``noise`` at a fixed level, ``fraction`` of the way from clean (0) to pure noise
        (1): the same noise level for every call, so losses of two models are comparable."""
        ...


class Family(ABC):
    """One base-model family: see the module docstring for what it must say."""

    name: ClassVar[str]  # short id: "sd", "sdxl", ...
    label: ClassVar[str]  # what people read: "Stable Diffusion 1.x/2.x"
    pipeline_class_name: ClassVar[str]  # the stock diffusers pipeline
    denoiser_key: ClassVar[str]  # "unet" or "transformer"
    text_encoder_keys: ClassVar[tuple[str, ...]]
    tokenizer_keys: ClassVar[tuple[str, ...]]
    default_resolution: ClassVar[int]
    schedule_keys: ClassVar[tuple[str, ...]] = ()  # noise-schedule settings that identify the model, beyond SD's
    latent_multiple: ClassVar[int] = 8
    # GPU memory (GiB) below which a job trains with gradient checkpointing from the start: an
    # estimate of a LoRA + prior step at the native size without it, with headroom; the OOM retry
    # in the worker still catches a card that turns out too small.
    full_speed_memory_gb: ClassVar[float] = 16.0  # image sides must be a multiple of this (VAE factor x any packing)
    # GPU memory (GiB) below which a LoRA job keeps the frozen denoiser in int8 (TrainConfig.quantize_base):
    # 0 for families whose bf16 weights leave room on any card the studio supports.
    int8_base_memory_gb: ClassVar[float] = 0.0
    sample_steps: ClassVar[int]
    sample_guidance: ClassVar[float]
    sampler_name: ClassVar[str]  # as image viewers read it in the PNG's parameters
    sampler_id: ClassVar[str]  # the sampler in the prior bank's key
    negative_prompts: ClassVar[bool] = True  # whether the pipeline takes a negative prompt
    denoiser_lora_targets: ClassVar[tuple[str, ...]]
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = ()  # empty: the text encoders are never trained
    # Key prefixes of the kohya-ss LoRA format that AUTOMATIC1111, Forge and ComfyUI read, per
    # component; empty for families whose tool-specific export is another format.
    kohya_prefixes: ClassVar[dict[str, str]] = {}

    # Loading ----------------------------------------------------------------------------------

    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def module_keys(self) -> tuple[str, ...]:
        """Every torch module of the family, in the order they are fingerprinted."""
        return (*self.text_encoder_keys, "vae", self.denoiser_key)

    def components_from_pipeline(self, pipe: Any) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
        """The modules and tokenizers of a loaded stock pipeline."""
        modules = {key: getattr(pipe, key) for key in self.module_keys()}
        tokenizers = {key: getattr(pipe, key) for key in self.tokenizer_keys}
        return modules, tokenizers

    @abstractmethod
    def training_schedule(self, pipe_scheduler: Any) -> Any:
        """The noise schedule the family trains with, from a loaded pipeline's scheduler."""

    def resolution_of(self, modules: Mapping[str, torch.nn.Module]) -> int:
        """The native resolution of loaded components (the family's default unless its config says)."""
        return self.default_resolution

    # Prompts ----------------------------------------------------------------------------------

    @abstractmethod
    def encode_prompts(self, model: BaseModel, text_encoders: Mapping[str, torch.nn.Module],
                       prompts: Sequence[str]) -> Conditioning:
        """Encode ``prompts`` with ``text_encoders`` (the base ones, or trainable copies) on their device."""

    def identifier_tokenizers(self, model: BaseModel) -> list[Any]:
        """The tokenizers in which the subject's identifier must be one rare token."""
        return [model.tokenizers[key] for key in self.tokenizer_keys]

    # Latents ----------------------------------------------------------------------------------

    def latent_distribution(self, vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) of ``pixels`` in [-1, 1]."""
        runner: Any = vae
        distribution = runner.encode(pixels).latent_dist
        return distribution.mean, distribution.std

    def to_latents(self, model: BaseModel, sampled: torch.Tensor) -> torch.Tensor:
        """A VAE sample as the denoiser's latent: shifted and scaled by the VAE's config by default."""
        config: Any = model.vae.config
        shift = config.get("shift_factor") or 0.0
        return (sampled - float(shift)) * float(config["scaling_factor"])

    # Training ---------------------------------------------------------------------------------

    @abstractmethod
    def objective(self, model: BaseModel, device: torch.device, *, min_snr_gamma: float | None,
                  offset_noise: float) -> Objective:
        """The training objective on ``device`` with the run's settings."""

    @abstractmethod
    def predict(self, model: BaseModel, denoiser: torch.nn.Module, batch: NoisyBatch, conditioning: Conditioning,
                meta: ImageMeta) -> torch.Tensor:
        """The denoiser's prediction for ``batch`` (the same shape as ``batch.target``)."""

    # Sampling ---------------------------------------------------------------------------------

    @abstractmethod
    def pipeline(self, model: BaseModel, parts: Mapping[str, torch.nn.Module]) -> Any:
        """The family's stock pipeline over the model's components, with ``parts`` replacing some."""

    def sample_defaults(self, model: BaseModel) -> tuple[int, float]:
        """The steps and guidance ``model`` samples well with when the job names none: the family's,
        unless the checkpoint is a different kind (a step-distilled one, or the base it was distilled from)."""
        return self.sample_steps, self.sample_guidance

    def render(self, pipe: Any, prompts: Sequence[str], *, negative_prompt: str, steps: int, guidance: float,
               resolution: int, generators: list[torch.Generator],
               autocast_dtype: torch.dtype | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
        """Sample one image per prompt; float pixels in [0, 1], shape ``(len(prompts), H, W, 3)``.
        ``size`` (width, height) for a portrait or landscape picture; square ``resolution`` without it."""
        images = self.call_pipeline(pipe, prompts, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                    resolution=resolution, generators=generators, autocast_dtype=autocast_dtype,
                                    output_type="np", size=size)
        return np.asarray(images, dtype=np.float32)

    def call_pipeline(self, pipe: Any, prompts: Sequence[str], *, negative_prompt: str, steps: int, guidance: float,
                      resolution: int, generators: list[torch.Generator], autocast_dtype: torch.dtype | None,
                      output_type: str, size: tuple[int, int] | None = None) -> Any:
        """The stock pipeline's call with the family's arguments; returns its ``images``."""
        extra: dict[str, Any] = {}
        if self.negative_prompts:
            extra["negative_prompt"] = [negative_prompt] * len(prompts)
        width, height = size or (resolution, resolution)
        with torch.inference_mode(), sampling_autocast(pipe.device, autocast_dtype):
            output = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                          height=height, width=width, generator=generators, output_type=output_type,
                          **extra)
        return output.images

    # Exports ----------------------------------------------------------------------------------

    def save_lora(self, folder: Path, layers: Mapping[str, dict[str, torch.Tensor]],
                  metadata: Mapping[str, dict[str, Any]]) -> None:
        """Write the diffusers-format LoRA (``pytorch_lora_weights.safetensors``) the stock pipeline loads."""
        arguments: dict[str, Any] = {}
        for key, state in layers.items():
            arguments[f"{key}_lora_layers"] = state
            arguments[f"{key}_lora_adapter_metadata"] = metadata[key]
        self.pipeline_class().save_lora_weights(str(folder), **arguments)

    def export_tool_lora(self, run_dir: Path) -> Path | None:
        """Write the run's LoRA in the format image tools load (AUTOMATIC1111, Forge, ComfyUI), next to the
        diffusers file; returns the file written, or None for a family without one. Default: the
        kohya-ss format under :attr:`kohya_prefixes`."""
        if not self.kohya_prefixes:
            return None
        from worker.engine.weights import export_kohya_lora

        return export_kohya_lora(run_dir, self)


def sampling_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` on a GPU (the trained pipelines are fp32); nothing on the CPU."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()
