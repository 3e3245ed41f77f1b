"""SDXL: two CLIP text encoders (the penultimate hidden states of both, side by side, and the pooled
vector of the second), a UNet with size and crop conditioning, the DDPM objective at 1024 px.

The size/crop conditioning ("micro-conditioning") tells the UNet each training image's original
size and where it was cropped; it is computed from each photo's real crop (and mirrored crop
when the photo is flipped), and sampling asks for an uncropped image at the target size, which is
what makes SDXL avoid cut-off heads.

SDXL's VAE overflows in fp16: it runs in fp32 (or bf16) unless the loaded VAE is the fp16-fix one
(whose config says ``force_upcast: false``).

Built-ins: ``tiny-sdxl`` (64 px, seconds on a CPU) and ``sdxl-arch`` (SDXL base's real sizes with
random weights, for GPU measurements).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from worker.engine.families.base import Conditioning, ImageMeta, NoisyBatch
from worker.engine.families.sd import (
    SD_SCHEDULE,
    UNetFamily,
    clip_text_encoder,
    dpm_solver,
    sd_vae,
    tokenize,
)

if TYPE_CHECKING:
    from worker.engine.models import BaseModel

SDXL_SCHEDULE: dict[str, Any] = {**SD_SCHEDULE, "timestep_spacing": "leading", "steps_offset": 1}
SDXL_VAE_SCALE = 0.13025


class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    label = "Stable Diffusion XL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoder_keys = ("text_encoder", "text_encoder_2")
    tokenizer_keys = ("tokenizer", "tokenizer_2")
    default_resolution = 1024
    full_speed_memory_gb = 40.0  # with checkpointing a 24 GB card is the goal (bench/train.py measures it)
    sample_steps = 30
    sample_guidance = 5.0
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

    def encode_prompts(self, model: BaseModel, text_encoders: Mapping[str, torch.nn.Module],
                       prompts: Sequence[str]) -> Conditioning:
        hidden: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        for tokenizer_key, encoder_key in zip(self.tokenizer_keys, self.text_encoder_keys, strict=True):
            encoder: Any = text_encoders[encoder_key]
            ids = tokenize(model.tokenizers[tokenizer_key], prompts).to(next(encoder.parameters()).device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the second encoder's projected pooled vector: the last one wins
        assert pooled is not None
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def latent_distribution(self, vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config: Any = vae
        if config.config.get("force_upcast", True):
            # The stock SDXL VAE overflows in fp16: encode in full precision (once, the latents are cached).
            with torch.autocast(device_type=pixels.device.type, enabled=False):
                return super().latent_distribution(vae, pixels.float())
        return super().latent_distribution(vae, pixels)

    def predict(self, model: BaseModel, denoiser: torch.nn.Module, batch: NoisyBatch, conditioning: Conditioning,
                meta: ImageMeta) -> torch.Tensor:
        unet: Any = denoiser
        height, width = batch.noisy.shape[-2:]
        scale = model.vae_scale_factor
        target = torch.tensor([height * scale, width * scale], device=meta.rows.device, dtype=meta.rows.dtype)
        time_ids = torch.cat([meta.rows, target.expand(meta.rows.shape[0], 2)], dim=1).to(batch.noisy.device)
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids}
        return unet(batch.noisy, batch.timesteps, conditioning["encoder_hidden_states"],  # type: ignore[no-any-return]
                    added_cond_kwargs=added).sample

    def render(self, pipe: Any, prompts: Sequence[str], *, negative_prompt: str, steps: int, guidance: float,
               resolution: int, generators: list[torch.Generator],
               autocast_dtype: torch.dtype | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
        """As every family samples, except under fp16 autocast with the stock VAE: the latents are then
        decoded outside autocast, in fp32 (under fp16 the stock SDXL VAE overflows to black images)."""
        vae: Any = pipe.vae
        if autocast_dtype != torch.float16 or not vae.config.get("force_upcast", True):
            return super().render(pipe, prompts, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                  resolution=resolution, generators=generators, autocast_dtype=autocast_dtype,
                                  size=size)
        latents = self.call_pipeline(pipe, prompts, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                     resolution=resolution, generators=generators, autocast_dtype=autocast_dtype,
                                     output_type="latent", size=size)
        with torch.inference_mode(), torch.autocast(device_type=latents.device.type, enabled=False):
            decoded = vae.decode(latents.float() / float(vae.config.scaling_factor), return_dict=False)[0]
        return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()  # type: ignore[no-any-return]

    def pipeline(self, model: BaseModel, parts: Mapping[str, torch.nn.Module]) -> Any:
        modules = {**model.modules, **parts}
        pipe: Any = StableDiffusionXLPipeline(
            vae=modules["vae"], text_encoder=modules["text_encoder"], text_encoder_2=modules["text_encoder_2"],
            tokenizer=model.tokenizers["tokenizer"], tokenizer_2=model.tokenizers["tokenizer_2"],
            unet=modules["unet"], scheduler=dpm_solver(model.noise_scheduler), add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


# --------------------------------------------------------------------------------------------
# Built-in models


def build(name: str, tokenizer: CLIPTokenizer) -> tuple[dict[str, torch.nn.Module], dict[str, Any], Any, int]:
    """The modules, tokenizers, training schedule and resolution of built-in ``name`` (random weights
    from the current RNG). Both tokenizers are ``tokenizer``."""
    if name == "tiny-sdxl":
        resolution = 64
        first = clip_text_encoder(tokenizer, width=32, intermediate=64, layers=2, heads=4, vocab=None)
        # Wider than the first, with its own projection size, as SDXL's OpenCLIP encoder is.
        second = clip_text_encoder(tokenizer, width=64, intermediate=128, layers=2, heads=4, vocab=None,
                                   projection=32, act="gelu")
        vae = sd_vae((16, 32, 32, 32), 1, 16, resolution, scaling_factor=SDXL_VAE_SCALE)
        unet_sizes: dict[str, Any] = {"block_out_channels": (32, 64), "transformer_layers_per_block": (1, 2),
                                      "attention_head_dim": (2, 4), "addition_time_embed_dim": 8,
                                      "norm_num_groups": 16, "layers_per_block": 1}
    elif name == "sdxl-arch":
        # SDXL base 1.0: CLIP ViT-L and OpenCLIP ViT-bigG text encoders, the SD VAE, the 2.57B UNet.
        resolution = 1024
        first = clip_text_encoder(tokenizer, width=768, intermediate=3072, layers=12, heads=12, vocab=49408)
        second = clip_text_encoder(tokenizer, width=1280, intermediate=5120, layers=32, heads=20, vocab=49408,
                                   projection=1280, act="gelu")
        vae = sd_vae((128, 256, 512, 512), 2, 32, resolution, scaling_factor=SDXL_VAE_SCALE)
        unet_sizes = {"block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
                      "attention_head_dim": (5, 10, 20), "addition_time_embed_dim": 256, "norm_num_groups": 32,
                      "layers_per_block": 2}
    else:
        raise KeyError(name)
    levels = len(unet_sizes["block_out_channels"])
    pooled = second.projection_dim
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=first.hidden_size + second.hidden_size, use_linear_projection=True,
        addition_embed_type="text_time",
        projection_class_embeddings_input_dim=6 * unet_sizes["addition_time_embed_dim"] + pooled,
        **unet_sizes,
    )
    modules: dict[str, torch.nn.Module] = {
        "text_encoder": CLIPTextModel(first), "text_encoder_2": CLIPTextModelWithProjection(second),
        "vae": vae, "unet": unet,
    }
    return modules, {"tokenizer": tokenizer, "tokenizer_2": tokenizer}, DDPMScheduler(**SDXL_SCHEDULE), resolution
