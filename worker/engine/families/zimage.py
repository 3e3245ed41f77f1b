"""Z-Image (Apache-2.0, 6B): a Qwen3 text encoder, the FLUX.1 VAE (16 channels, shift and scale),
and a single-stream rectified-flow transformer (S3-DiT) that takes lists of variable-length inputs.

- Prompts: a user turn of the chat template (thinking enabled, as ``ZImagePipeline`` formats it),
  padded to 512 tokens; the second-to-last hidden layer of Qwen3, of which the transformer sees only
  the prompt's real tokens. The conditioning keeps the padded states and the mask, so every prompt
  caches to the same shape; :meth:`ZImage.predict` unpads them into the transformer's lists.
- Latents: (sample − shift_factor) · scaling_factor; the transformer patchifies 2×2 itself.
- Objective: flow matching, σ logit-normal then the model's shift (the turbo's scheduler declares a
  static shift of 3). The transformer is trained with ``t = 1 − σ`` (its time runs from noise to
  image) and predicts x₀ − ε: the *negated* velocity, which :meth:`ZImage.predict` undoes.
- Guidance: Z-Image-Turbo is distilled: 9 steps (8 transformer calls) with no classifier-free
  guidance (``guidance_scale=0``); the pipeline's CFG convention is pred = pos + s·(pos − neg), so
  s = 0 is the conditional prediction alone.
- LoRA: attention (to_q, to_k, to_v, to_out.0) and MLP (feed_forward w1, w2, w3) of every block.

Built-ins: ``tiny-zimage`` (64 px, seconds on a CPU) and ``zimage-arch`` (Z-Image's real sizes
with random weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from transformers import Qwen3ForCausalLM

from worker.engine.families.base import Conditioning, ImageMeta, NoisyBatch
from worker.engine.families.qwen import (
    QWEN3_4B,
    QwenFlowFamily,
    chat_tokens,
    flow_schedule,
    qwen3_config,
    tiny_qwen_tokenizer,
)

if TYPE_CHECKING:

    from worker.engine.models import BaseModel

# Z-Image-Turbo's scheduler: a static shift of 3.
ZIMAGE_SCHEDULE: dict[str, Any] = {"shift": 3.0, "use_dynamic_shifting": False}
FLUX1_VAE_SCALE, FLUX1_VAE_SHIFT = 0.3611, 0.1159
ZIMAGE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class ZImage(QwenFlowFamily):
    name = "zimage"
    label = "Z-Image"
    pipeline_class_name = "ZImagePipeline"
    tokens_per_latent_pixel = 0.25  # the transformer cuts the latent into 2×2 patches
    # An estimate (not measured: no GPU here) of a LoRA + prior step at 1024 px without checkpointing:
    # Z-Image: 12.3 GB of bf16 weights and 34 blocks of 3840-wide activations.
    full_speed_memory_gb = 64.0
    # Z-Image's 12.31 GB of bf16 transformer weights are 6.16 GB in int8 (bench/flops.py --weights).
    int8_base_memory_gb = 25.0
    sample_steps = 9  # Z-Image-Turbo: 8 transformer calls, and no CFG (it is distilled) ...
    sample_guidance = 0.0
    base_sample_steps = 50  # ... the undistilled Z-Image base samples with ~50 steps at CFG 4
    base_sample_guidance = 4.0
    negative_prompts = True
    denoiser_lora_targets = ZIMAGE_TARGETS

    # Prompts ----------------------------------------------------------------------------------

    def encode_prompts(self, model: BaseModel, text_encoders: Mapping[str, torch.nn.Module],
                       prompts: Sequence[str]) -> Conditioning:
        encoder: Any = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        ids, mask = chat_tokens(model.tokenizers["tokenizer"], prompts, enable_thinking=True)
        mask = mask.to(device).bool()
        hidden = encoder(input_ids=ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return {"encoder_hidden_states": hidden, "attention_mask": mask.to(hidden.dtype)}

    # Sampling defaults ------------------------------------------------------------------------

    def is_turbo(self, model: BaseModel) -> bool:
        """Whether ``model`` is the distilled Z-Image-Turbo: the built-ins are, and so is any checkpoint
        named for it ("Tongyi-MAI/Z-Image-Turbo", "z_image_turbo_bf16.safetensors"); both checkpoints
        share one architecture and one pipeline, so the name is all that tells them apart."""
        return "builtin" in model.source_info or "turbo" in model.spec.lower()

    def sample_defaults(self, model: BaseModel) -> tuple[int, float]:
        if self.is_turbo(model):
            return self.sample_steps, self.sample_guidance
        return self.base_sample_steps, self.base_sample_guidance

    # Training ---------------------------------------------------------------------------------

    def predict(self, model: BaseModel, denoiser: torch.nn.Module, batch: NoisyBatch, conditioning: Conditioning,
                meta: ImageMeta) -> torch.Tensor:
        transformer: Any = denoiser
        states, mask = conditioning["encoder_hidden_states"], conditioning["attention_mask"] > 0.5
        captions = [states[row][mask[row]] for row in range(states.shape[0])]
        images = list(batch.noisy.unsqueeze(2).unbind(dim=0))  # each [C, 1 frame, H, W]
        time = (1.0 - batch.timesteps).to(batch.noisy.dtype)
        outputs = transformer(images, time, captions, return_dict=False)[0]
        return -torch.stack(list(outputs)).squeeze(2)

    # Sampling ---------------------------------------------------------------------------------

    def pipeline(self, model: BaseModel, parts: Mapping[str, torch.nn.Module]) -> Any:
        modules = {**model.modules, **parts}
        pipe: Any = ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config),
            vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=model.tokenizers["tokenizer"],
            transformer=modules["transformer"],
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # Exports ----------------------------------------------------------------------------------

    @staticmethod
    def native_name(path: str) -> tuple[str, int, int] | None:
        return native_name(path)


def native_name(path: str) -> tuple[str, int, int] | None:
    """The original (Tongyi / ComfyUI) name of a diffusers Z-Image transformer layer: (path, part, parts).

    The original checkpoint fuses q, k and v into ``attention.qkv`` and names the output
    projection ``attention.out``; the rest of the tree has the same names.
    """
    fused = {"attention.to_q": 0, "attention.to_k": 1, "attention.to_v": 2}
    for suffix, part in fused.items():
        if path.endswith(f".{suffix}"):
            return f"{path[: -len(suffix)]}attention.qkv", part, 3
    if path.endswith(".attention.to_out.0"):
        return f"{path[: -len('to_out.0')]}out", 0, 1
    if any(path.endswith(f".feed_forward.{w}") for w in ("w1", "w2", "w3")):
        return path, 0, 1
    return None


# --------------------------------------------------------------------------------------------
# Built-in models


def flux1_vae(channels: tuple[int, ...], layers: int, groups: int, latent_channels: int,
              resolution: int) -> AutoencoderKL:
    """A VAE shaped like FLUX.1's (which Z-Image uses): no quant convs, shift and scale."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels, layers_per_block=layers,
        latent_channels=latent_channels, norm_num_groups=groups, sample_size=resolution,
        scaling_factor=FLUX1_VAE_SCALE, shift_factor=FLUX1_VAE_SHIFT, use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build(name: str, _clip_tokenizer: Any) -> tuple[dict[str, torch.nn.Module], dict[str, Any], Any, int]:
    """The modules, tokenizers, training schedule and resolution of built-in ``name`` (random weights
    from the current RNG), with the byte-level BPE tokenizer made in this repository."""
    tokenizer = tiny_qwen_tokenizer()
    if name == "tiny-zimage":
        resolution = 64
        text = qwen3_config(tokenizer, hidden=32, intermediate=64, layers=3, heads=2, kv_heads=1, head_dim=16)
        vae = flux1_vae((16, 32, 32, 32), 1, 16, 4, resolution)
        transformer = ZImageTransformer2DModel(in_channels=4, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
                                               n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12])
    elif name == "zimage-arch":
        # Z-Image (Turbo): Qwen3-4B, the FLUX.1 VAE, a 30-layer 3840-wide single-stream DiT.
        resolution = 1024
        text = qwen3_config(tokenizer, **QWEN3_4B)
        vae = flux1_vae((128, 256, 512, 512), 2, 32, 16, resolution)
        transformer = ZImageTransformer2DModel(in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
                                               n_kv_heads=30, cap_feat_dim=QWEN3_4B["hidden"],
                                               axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])
    else:
        raise KeyError(name)
    modules: dict[str, torch.nn.Module] = {"text_encoder": Qwen3ForCausalLM(text), "vae": vae,
                                           "transformer": transformer}
    return modules, {"tokenizer": tokenizer}, flow_schedule(**ZIMAGE_SCHEDULE), resolution
