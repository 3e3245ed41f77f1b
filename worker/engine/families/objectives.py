"""Training objectives the families share: DDPM noise prediction (epsilon or v) with Min-SNR weighting.

The order in which random numbers are drawn is part of the contract: the same generator state
gives the same noise, offset noise and timesteps, so a run's loss curve is a function of its seed.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.engine.errors import EngineInputError
from worker.engine.families.base import NoisyBatch


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Per-example Min-SNR-γ loss weights (Hang et al. 2023) for the given timesteps.

    With SNR(t) = ᾱ_t / (1 − ᾱ_t): ε-prediction uses min(SNR, γ) / SNR and v-prediction
    min(SNR, γ) / (SNR + 1), both equal to weighting the x₀ error by min(SNR, γ).
    """
    alphas = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1.0 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise EngineInputError(f"min_snr_gamma needs an epsilon or v_prediction model, not {prediction_type!r}")


class DDPMObjective:
    """x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε with t uniform over the training steps; the target is ε or
    v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ as the model was trained; optional offset noise and Min-SNR weights."""

    def __init__(self, noise_scheduler: Any, device: torch.device, *, min_snr_gamma: float | None = None,
                 offset_noise: float = 0.0) -> None:
        config = noise_scheduler.config
        self.prediction_type = str(config["prediction_type"])
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise EngineInputError(f"the model predicts {self.prediction_type!r}; only epsilon and "
                                   "v_prediction models can be trained")
        self.num_timesteps = int(config["num_train_timesteps"])
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device, torch.float32)
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.device = device

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        if self.offset_noise:
            noise = noise + self.offset_noise * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=self.device)
        timesteps = torch.randint(0, self.num_timesteps, (latents.shape[0],), generator=generator, device=self.device)
        return self.at(latents, noise, timesteps)

    def at_fraction(self, latents: torch.Tensor, noise: torch.Tensor, fraction: float) -> NoisyBatch:
        step = min(self.num_timesteps - 1, int(round(fraction * self.num_timesteps)))
        return self.at(latents, noise, torch.full((latents.shape[0],), step, device=latents.device, dtype=torch.long))

    def at(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisyBatch:
        """Noise ``latents`` with ``noise`` at ``timesteps`` (one per example)."""
        shape = (-1,) + (1,) * (latents.ndim - 1)
        signal = self.alphas_cumprod[timesteps].sqrt().view(shape)
        sigma = (1.0 - self.alphas_cumprod[timesteps]).sqrt().view(shape)
        noisy = signal * latents + sigma * noise
        target = noise if self.prediction_type == "epsilon" else signal * noise - sigma * latents
        weights = None
        if self.min_snr_gamma is not None:
            weights = min_snr_weights(timesteps, self.alphas_cumprod, self.min_snr_gamma, self.prediction_type)
        return NoisyBatch(noisy=noisy, timesteps=timesteps, target=target, weights=weights)
