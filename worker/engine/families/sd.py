"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet, the DDPM objective (epsilon or v).

The family of the DreamBooth paper. Built-ins: ``tiny`` (a few MB, 64 px, for tests and the CPU
demo) and ``sd15-arch`` (SD 1.5's real sizes with random weights, for GPU measurements).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from worker.engine.families.base import Conditioning, Family, ImageMeta, NoisyBatch, Objective
from worker.engine.families.objectives import DDPMObjective

if TYPE_CHECKING:
    from worker.engine.models import BaseModel

# The noise schedule every SD 1.x checkpoint was trained with.
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP token ids padded to the tokenizer's 77 positions."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def dpm_solver(noise_scheduler: Any) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M) on the model's training schedule: 20–30 steps give what 50 ancestral steps do."""
    return DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++",
                                                   steps_offset=1)


class UNetFamily(Family):
    """What SD 1.x/2.x and SDXL share: a UNet trained with the DDPM objective, sampled with DPM-Solver++,
    LoRA on its attention projections and on the CLIP text encoders' attention."""

    denoiser_key = "unet"
    sampler_name = "DPM++ 2M"
    sampler_id = "dpmsolver++"
    denoiser_lora_targets = UNET_ATTENTION
    text_encoder_lora_targets = CLIP_ATTENTION

    def training_schedule(self, pipe_scheduler: Any) -> Any:
        return DDPMScheduler.from_config(pipe_scheduler.config)

    def resolution_of(self, modules: Mapping[str, torch.nn.Module]) -> int:
        unet: Any = modules["unet"]
        vae: Any = modules["vae"]
        return int(unet.config.sample_size) * int(2 ** (len(vae.config.block_out_channels) - 1))

    def objective(self, model: BaseModel, device: torch.device, *, min_snr_gamma: float | None,
                  offset_noise: float) -> Objective:
        return DDPMObjective(model.noise_scheduler, device, min_snr_gamma=min_snr_gamma, offset_noise=offset_noise)


class StableDiffusion(UNetFamily):
    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    pipeline_class_name = "StableDiffusionPipeline"
    text_encoder_keys = ("text_encoder",)
    tokenizer_keys = ("tokenizer",)
    default_resolution = 512
    sample_steps = 25
    sample_guidance = 7.5
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}

    def encode_prompts(self, model: BaseModel, text_encoders: Mapping[str, torch.nn.Module],
                       prompts: Sequence[str]) -> Conditioning:
        encoder: Any = text_encoders["text_encoder"]
        ids = tokenize(model.tokenizers["tokenizer"], prompts).to(next(encoder.parameters()).device)
        return {"encoder_hidden_states": encoder(ids)[0]}

    def predict(self, model: BaseModel, denoiser: torch.nn.Module, batch: NoisyBatch, conditioning: Conditioning,
                meta: ImageMeta) -> torch.Tensor:
        unet: Any = denoiser
        return unet(batch.noisy, batch.timesteps, conditioning["encoder_hidden_states"]).sample  # type: ignore[no-any-return]

    def pipeline(self, model: BaseModel, parts: Mapping[str, torch.nn.Module]) -> Any:
        modules = {**model.modules, **parts}
        pipe: Any = StableDiffusionPipeline(
            vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=model.tokenizers["tokenizer"],
            unet=modules["unet"], scheduler=dpm_solver(model.noise_scheduler), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


# --------------------------------------------------------------------------------------------
# Built-in models


@dataclass(frozen=True)
class Architecture:
    """The sizes of a built-in SD-style model: a CLIP text encoder, a VAE with 8x downsampling, and a
    UNet whose levels all have cross-attention but the deepest."""

    resolution: int
    text_width: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_vocab: int | None  # None: the tokenizer's own size
    vae_channels: tuple[int, ...]
    vae_layers: int
    vae_groups: int
    unet_channels: tuple[int, ...]
    unet_layers: int


ARCHITECTURES: dict[str, Architecture] = {
    "tiny": Architecture(resolution=64, text_width=32, text_intermediate=64, text_layers=2, text_heads=4,
                         text_vocab=None, vae_channels=(16, 32, 32, 32), vae_layers=1, vae_groups=16,
                         unet_channels=(32, 64), unet_layers=1),
    # SD 1.5: CLIP ViT-L/14's text encoder (its 49408-token vocabulary; our tokenizer uses a prefix of
    # it), the 83.7M-parameter VAE and the 859.5M-parameter UNet.
    "sd15-arch": Architecture(resolution=512, text_width=768, text_intermediate=3072, text_layers=12, text_heads=12,
                              text_vocab=49408, vae_channels=(128, 256, 512, 512), vae_layers=2, vae_groups=32,
                              unet_channels=(320, 640, 1280, 1280), unet_layers=2),
}


def clip_text_encoder(tokenizer: CLIPTokenizer, *, width: int, intermediate: int, layers: int, heads: int,
                      vocab: int | None, projection: int | None = None, act: str = "quick_gelu") -> CLIPTextConfig:
    """A CLIP text-encoder config sized as given, with the tokenizer's special tokens."""
    return CLIPTextConfig(
        vocab_size=vocab or len(tokenizer), hidden_size=width, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
        projection_dim=projection or width, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sd_vae(channels: tuple[int, ...], layers: int, groups: int, resolution: int, *,
           scaling_factor: float = 0.18215) -> AutoencoderKL:
    levels = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=channels, layers_per_block=layers,
        latent_channels=4, norm_num_groups=groups, sample_size=resolution, scaling_factor=scaling_factor,
    )


def build_components(arch: Architecture, tokenizer: CLIPTokenizer
                     ) -> tuple[CLIPTextModel, AutoencoderKL, UNet2DConditionModel]:
    """Text encoder, VAE and UNet of ``arch`` with random weights from the current RNG, in that order."""
    text_encoder = CLIPTextModel(clip_text_encoder(tokenizer, width=arch.text_width,
                                                   intermediate=arch.text_intermediate, layers=arch.text_layers,
                                                   heads=arch.text_heads, vocab=arch.text_vocab))
    vae = sd_vae(arch.vae_channels, arch.vae_layers, arch.vae_groups, arch.resolution)
    attention_levels = len(arch.unet_channels) - 1
    unet = UNet2DConditionModel(
        sample_size=arch.resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.unet_layers,
        down_block_types=("CrossAttnDownBlock2D",) * attention_levels + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * attention_levels,
        cross_attention_dim=arch.text_width,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return text_encoder, vae, unet


def build(name: str, tokenizer: CLIPTokenizer) -> tuple[dict[str, torch.nn.Module], dict[str, Any], Any, int]:
    """The modules, tokenizers, training schedule and resolution of built-in ``name`` (random weights
    from the current RNG)."""
    arch = ARCHITECTURES[name]
    text_encoder, vae, unet = build_components(arch, tokenizer)
    return ({"text_encoder": text_encoder, "vae": vae, "unet": unet}, {"tokenizer": tokenizer},
            DDPMScheduler(**SD_SCHEDULE), arch.resolution)
