"""The flow-matching objective of the rectified-flow transformers (FLUX.2, Z-Image).

A clean latent x₀ and a noise ε are mixed on a straight line, x_σ = (1 − σ)·x₀ + σ·ε, σ ∈ [0, 1],
and the denoiser predicts the velocity along it, v = dx_σ/dσ = ε − x₀ (what diffusers'
``FlowMatchEulerDiscreteScheduler`` integrates: x_{σ'} = x_σ + (σ' − σ)·v).

How σ is drawn is part of how a family was trained:

- ``law``: ``"logit_normal"`` (σ = sigmoid(n), n ~ N(mean, std); SD3 and FLUX, it spends the steps
  in the middle of the path where the velocity is hardest to predict) or ``"uniform"``;
- then the model's own *shift* toward noise, the same one its sampler uses: a static one,
  σ' = s·σ / (1 + (s − 1)·σ), or a resolution-dependent one, σ' = e^μ / (e^μ + 1/σ − 1) with
  μ growing linearly with the number of image tokens (bigger images keep more signal at a given
  σ, so they need more noise). ``FlowShift.from_scheduler`` reads which from the model's scheduler
  config, so training draws from the distribution its sampler walks.

Loss weighting is uniform (what diffusers' DreamBooth scripts for these models default to).

The order of random draws is fixed (the noise, then the σ law's normal or uniform numbers), so the
same generator state gives the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from worker.engine.errors import EngineInputError
from worker.engine.families.base import NoisyBatch

SigmaLaw = Literal["logit_normal", "uniform"]


@dataclass(frozen=True)
class FlowShift:
    """The noise shift of a flow-matching model: static (``shift``) or resolution-dependent (``dynamic``).

    Dynamic: μ = base_shift + (max_shift − base_shift)·(tokens − base_tokens)/(max_tokens − base_tokens),
    the line diffusers' FLUX and Z-Image pipelines compute ``mu`` with.
    """

    shift: float = 1.0
    dynamic: bool = False
    base_tokens: int = 256
    max_tokens: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_scheduler(cls, config: Mapping[str, Any]) -> FlowShift:
        """The shift a ``FlowMatchEulerDiscreteScheduler`` config describes."""
        return cls(shift=float(config.get("shift", 1.0) or 1.0), dynamic=bool(config.get("use_dynamic_shifting")),
                   base_tokens=int(config.get("base_image_seq_len", 256) or 256),
                   max_tokens=int(config.get("max_image_seq_len", 4096) or 4096),
                   base_shift=float(config.get("base_shift", 0.5) or 0.5),
                   max_shift=float(config.get("max_shift", 1.15) or 1.15))

    def mu(self, tokens: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens)
        return self.base_shift + slope * (tokens - self.base_tokens)

    def apply(self, sigmas: torch.Tensor, tokens: int) -> torch.Tensor:
        """Shift ``sigmas`` in (0, 1) for an image of ``tokens`` transformer tokens."""
        if self.dynamic:
            scale = math.exp(self.mu(tokens))
            return scale / (scale + (1.0 / sigmas - 1.0))
        if self.shift == 1.0:
            return sigmas
        return self.shift * sigmas / (1.0 + (self.shift - 1.0) * sigmas)


class FlowMatchObjective:
    """x_σ = (1 − σ)·x₀ + σ·ε, target ε − x₀, σ from ``law`` then ``shift`` (see the module docstring).

    ``tokens_per_latent_pixel`` converts a latent's spatial size into the transformer's token count
    for the resolution-dependent shift (¼ for 2×2 patches of the latent map the denoiser sees).
    """

    def __init__(self, device: torch.device, *, shift: FlowShift, law: SigmaLaw = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, tokens_per_latent_pixel: float = 1.0,
                 min_snr_gamma: float | None = None, offset_noise: float = 0.0) -> None:
        if min_snr_gamma is not None:
            raise EngineInputError("min_snr_gamma is a DDPM weighting; a flow-matching model is trained without it: "
                                   "set min_snr_gamma=None")
        if law not in ("logit_normal", "uniform"):
            raise EngineInputError(f"unknown sigma law {law!r}: choose logit_normal or uniform")
        self.device = device
        self.shift = shift
        self.law = law
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.tokens_per_latent_pixel = tokens_per_latent_pixel
        self.offset_noise = offset_noise

    def tokens(self, latents: torch.Tensor) -> int:
        return max(1, round(latents.shape[-2] * latents.shape[-1] * self.tokens_per_latent_pixel))

    def draw_sigmas(self, count: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` noise levels from the family's training law and shift."""
        if self.law == "logit_normal":
            normal = torch.randn((count,), generator=generator, device=self.device)
            sigmas = torch.sigmoid(normal * self.logit_std + self.logit_mean)
        else:
            sigmas = torch.rand((count,), generator=generator, device=self.device)
        # Keep σ off the end points: 1/σ in the shift, and σ = 0 teaches nothing.
        return self.shift.apply(sigmas.clamp(1e-5, 1.0 - 1e-5), tokens)

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        if self.offset_noise:
            noise = noise + self.offset_noise * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=self.device)
        sigmas = self.draw_sigmas(latents.shape[0], self.tokens(latents), generator)
        return self.at(latents, noise, sigmas)

    def at_fraction(self, latents: torch.Tensor, noise: torch.Tensor, fraction: float) -> NoisyBatch:
        sigmas = torch.full((latents.shape[0],), float(fraction), device=latents.device)
        return self.at(latents, noise, sigmas)

    @staticmethod
    def at(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> NoisyBatch:
        """Noise ``latents`` with ``noise`` at ``sigmas`` (one per example); ``timesteps`` are the sigmas."""
        sigma = sigmas.to(latents.dtype).view((-1,) + (1,) * (latents.ndim - 1))
        noisy = (1.0 - sigma) * latents + sigma * noise
        return NoisyBatch(noisy=noisy, timesteps=sigmas, target=noise - latents, weights=None)
