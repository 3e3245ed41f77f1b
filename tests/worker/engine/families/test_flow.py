"""The flow-matching objective: hand computations, the shift laws against diffusers' scheduler, reproducibility."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from worker.engine.errors import EngineInputError
from worker.engine.families.flow import FlowMatchObjective, FlowShift


def test_fixed_sigma_matches_a_hand_computation() -> None:
    latents = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]])
    noise = torch.tensor([[[[0.2, 0.4], [-1.0, 3.0]]]])
    objective = FlowMatchObjective(torch.device("cpu"), shift=FlowShift())
    batch = objective.at_fraction(latents, noise, 0.25)
    # x_σ = (1 − σ)·x₀ + σ·ε and v = ε − x₀ at σ = 0.25, element by element.
    expected_noisy = torch.tensor([[[[0.75 * 1.0 + 0.25 * 0.2, 0.75 * -2.0 + 0.25 * 0.4],
                                     [0.75 * 0.5 + 0.25 * -1.0, 0.75 * 0.0 + 0.25 * 3.0]]]])
    expected_target = torch.tensor([[[[0.2 - 1.0, 0.4 + 2.0], [-1.0 - 0.5, 3.0 - 0.0]]]])
    assert torch.allclose(batch.noisy, expected_noisy)
    assert torch.allclose(batch.target, expected_target)
    assert batch.timesteps.tolist() == [0.25] and batch.weights is None
    # The velocity carries x_σ to the clean latent: x₀ = x_σ − σ·v.
    assert torch.allclose(batch.noisy - 0.25 * batch.target, latents)


def test_static_shift_is_the_schedulers() -> None:
    scheduler: Any = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.linspace(1.0, 1 / 1000, 1000)
    shifted = FlowShift.from_scheduler(scheduler.config).apply(unshifted, tokens=4096)
    assert torch.allclose(shifted, scheduler.sigmas.float(), atol=1e-6)
    assert FlowShift(shift=3.0).apply(torch.tensor([0.5]), 1).item() == pytest.approx(0.75)


def test_dynamic_shift_grows_with_the_image_and_is_the_schedulers() -> None:
    config = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
              "max_image_seq_len": 4096}
    scheduler: Any = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    shift = FlowShift.from_scheduler(scheduler.config)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    for tokens in (256, 1024, 4096):
        mu = shift.mu(tokens)
        assert torch.allclose(shift.apply(sigmas, tokens), scheduler.time_shift(mu, 1.0, sigmas), atol=1e-6)
    assert shift.mu(256) == pytest.approx(0.5) and shift.mu(4096) == pytest.approx(1.15)
    # σ = 0.5 becomes e^μ / (e^μ + 1): more noise for a bigger image.
    assert shift.apply(torch.tensor([0.5]), 4096).item() == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1))
    assert shift.apply(torch.tensor([0.5]), 4096).item() > shift.apply(torch.tensor([0.5]), 256).item()


def test_draws_follow_the_law_and_repeat_for_a_seed() -> None:
    latents = torch.randn(4096, 2, 2, 2)
    objective = FlowMatchObjective(torch.device("cpu"), shift=FlowShift(), law="logit_normal")
    first = objective.draw(latents, torch.Generator().manual_seed(3))
    again = objective.draw(latents, torch.Generator().manual_seed(3))
    assert torch.equal(first.noisy, again.noisy) and torch.equal(first.timesteps, again.timesteps)
    logits = torch.logit(first.timesteps)
    assert abs(logits.mean().item()) < 0.1 and abs(logits.std().item() - 1.0) < 0.1  # logit-normal(0, 1)
    uniform = FlowMatchObjective(torch.device("cpu"), shift=FlowShift(), law="uniform")
    drawn = uniform.draw(latents, torch.Generator().manual_seed(3)).timesteps
    assert drawn.min().item() > 0.0 and drawn.max().item() < 1.0 and abs(drawn.mean().item() - 0.5) < 0.03
    # Noise, then σ, from the same generator: the batch is the objective's own hand computation.
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = torch.sigmoid(torch.randn((4096,), generator=generator)).clamp(1e-5, 1 - 1e-5)
    assert torch.allclose(first.noisy, FlowMatchObjective.at(latents, noise, sigmas).noisy)


def test_min_snr_and_unknown_laws_are_refused() -> None:
    with pytest.raises(EngineInputError, match="min_snr_gamma"):
        FlowMatchObjective(torch.device("cpu"), shift=FlowShift(), min_snr_gamma=5.0)
    with pytest.raises(EngineInputError, match="sigma law"):
        FlowMatchObjective(torch.device("cpu"), shift=FlowShift(), law="cosine")  # type: ignore[arg-type]
