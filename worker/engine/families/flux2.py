"""FLUX.2 klein (Apache-2.0, 4B): a Qwen3 text encoder, the FLUX.2 VAE with 2×2 patch packing and
batch-norm latent statistics, and a rectified-flow MM-DiT transformer.

- Prompts: a user turn of the chat template (thinking disabled), padded to 512 tokens, read from
  Qwen3's hidden layers 9, 18 and 27 side by side (``Flux2KleinPipeline._get_qwen3_prompt_embeds``).
- Latents: the VAE sample's 2×2 patches folded into channels (32 → 128), then normalised by the
  VAE's batch-norm running mean and variance; the transformer sees them as a sequence of tokens
  with (t, h, w, l) position ids, and the prompt tokens with ids (0, 0, 0, index).
- Objective: flow matching, σ logit-normal then the resolution-dependent shift the model's
  scheduler declares; the transformer is called with ``timestep = σ`` and no guidance embedding.
- Guidance: klein 4B is step-distilled (4 steps, no classifier-free guidance: the pipeline ignores
  ``guidance_scale`` when ``is_distilled``); the base klein checkpoint samples with CFG 4 over 50 steps.
- LoRA: every attention and MLP projection of the double-stream blocks (image and text streams)
  and the fused ``to_qkv_mlp_proj``/``to_out`` of the single-stream blocks.

Built-ins: ``tiny-flux2`` (64 px, seconds on a CPU) and ``flux2-klein-arch`` (klein 4B's real sizes
with random weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
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

HIDDEN_LAYERS = (9, 18, 27)  # the pipeline's default text_encoder_out_layers
MAX_SINGLE_BLOCKS = 64  # FLUX.2 dev has 48 single-stream blocks, klein 20 (4B) and 24 (9B)
# The scheduler of the published klein checkpoints: resolution-dependent (exponential) shift.
FLUX2_SCHEDULE: dict[str, Any] = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                                  "base_image_seq_len": 256, "max_image_seq_len": 4096,
                                  "time_shift_type": "exponential"}
DOUBLE_BLOCK_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
# A single block's "attn.to_out" is a Linear, a double block's a ModuleList (whose Linear is
# "to_out.0"): peft matches target names as suffixes, so the single blocks' are named in full.
SINGLE_BLOCK_TARGETS = ("to_qkv_mlp_proj",
                        *(f"single_transformer_blocks.{index}.attn.to_out" for index in range(MAX_SINGLE_BLOCKS)))


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, 4C, H/2, W/2]: each 2×2 patch folded into channels, as FLUX.2 packs them."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(batch, channels * 4, height // 2, width // 2)


def batch_norm_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent mean and standard deviation per packed channel, shaped to broadcast over ``like``."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def position_ids(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(t, h, w, l) ids of an image's ``height × width`` tokens: [B, H·W, 4]."""
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    return grid.unsqueeze(0).expand(batch, -1, -1).to(device)


def text_ids(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(t, h, w, l) ids of ``length`` prompt tokens: [B, L, 4] with l = the token's index."""
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return grid.unsqueeze(0).expand(batch, -1, -1).to(device)


@lru_cache(maxsize=32)
def _declared_distilled(source: str) -> bool:
    """Whether a diffusers folder or hub id declares a step-distilled klein (its model_index.json)."""
    from diffusers import DiffusionPipeline

    try:
        return bool(dict(DiffusionPipeline.load_config(source)).get("is_distilled", True))
    except Exception:  # a single file, or the index is unreachable: klein 4B itself is distilled
        return True


class Flux2Klein(QwenFlowFamily):
    name = "flux2"
    label = "FLUX.2 klein"
    pipeline_class_name = "Flux2KleinPipeline"
    tokens_per_latent_pixel = 1.0  # the latents are already packed: one token per latent pixel
    # An estimate (not measured: no GPU here) of a LoRA + prior step at 1024 px without checkpointing:
    # klein 4B: 7.8 GB of bf16 weights and the activations of two 4608-token sequences.
    full_speed_memory_gb = 48.0
    # klein's 7.75 GB of bf16 transformer weights are 3.88 GB in int8 (bench/flops.py --weights): cards of 24 GB
    # and less keep them in int8, so a LoRA + prior step with checkpointing leaves room for activations.
    int8_base_memory_gb = 25.0
    sample_steps = 4  # klein 4B is step-distilled (4 steps, no guidance) ...
    sample_guidance = 1.0
    base_sample_steps = 50  # ... the undistilled klein base samples with ~50 steps at CFG 4
    base_sample_guidance = 4.0
    negative_prompts = False  # Flux2KleinPipeline takes none (its CFG uses the empty prompt)
    denoiser_lora_targets = DOUBLE_BLOCK_TARGETS + SINGLE_BLOCK_TARGETS

    def is_distilled(self, model: BaseModel) -> bool:
        if "builtin" in model.source_info:
            return True
        return _declared_distilled(model.spec)

    def sample_defaults(self, model: BaseModel) -> tuple[int, float]:
        if self.is_distilled(model):
            return self.sample_steps, self.sample_guidance
        return self.base_sample_steps, self.base_sample_guidance

    # Prompts ----------------------------------------------------------------------------------

    def encode_prompts(self, model: BaseModel, text_encoders: Mapping[str, torch.nn.Module],
                       prompts: Sequence[str]) -> Conditioning:
        encoder: Any = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        ids, mask = chat_tokens(model.tokenizers["tokenizer"], prompts, enable_thinking=False)
        output = encoder(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                         use_cache=False)
        layers = torch.stack([output.hidden_states[index] for index in HIDDEN_LAYERS], dim=1)  # [B, 3, L, D]
        batch, count, length, width = layers.shape
        return {"encoder_hidden_states": layers.permute(0, 2, 1, 3).reshape(batch, length, count * width)}

    # Latents ----------------------------------------------------------------------------------

    def to_latents(self, model: BaseModel, sampled: torch.Tensor) -> torch.Tensor:
        packed = patchify(sampled)
        mean, std = batch_norm_stats(model.vae, packed)
        return (packed - mean) / std

    # Training ---------------------------------------------------------------------------------

    def predict(self, model: BaseModel, denoiser: torch.nn.Module, batch: NoisyBatch, conditioning: Conditioning,
                meta: ImageMeta) -> torch.Tensor:
        transformer: Any = denoiser
        noisy = batch.noisy
        count, channels, height, width = noisy.shape
        tokens = noisy.reshape(count, channels, height * width).permute(0, 2, 1)
        prompt = conditioning["encoder_hidden_states"]
        output = transformer(hidden_states=tokens, encoder_hidden_states=prompt,
                             timestep=batch.timesteps.to(tokens.dtype), guidance=None,
                             img_ids=position_ids(count, height, width, noisy.device),
                             txt_ids=text_ids(count, prompt.shape[1], noisy.device), return_dict=False)[0]
        return output.permute(0, 2, 1).reshape(count, channels, height, width)  # type: ignore[no-any-return]

    # Sampling ---------------------------------------------------------------------------------

    def pipeline(self, model: BaseModel, parts: Mapping[str, torch.nn.Module]) -> Any:
        modules = {**model.modules, **parts}
        pipe: Any = Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config),
            vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=model.tokenizers["tokenizer"],
            transformer=modules["transformer"], is_distilled=self.is_distilled(model),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # Exports ----------------------------------------------------------------------------------

    @staticmethod
    def native_name(path: str) -> tuple[str, int, int] | None:
        return native_name(path)


def native_name(path: str) -> tuple[str, int, int] | None:
    """The original (BFL / ComfyUI) name of a diffusers FLUX.2 transformer layer: (path, part, parts)."""
    pieces = path.split(".")
    if len(pieces) < 3:
        return None
    kind, index, rest = pieces[0], pieces[1], ".".join(pieces[2:])
    if kind == "transformer_blocks":
        block = f"double_blocks.{index}"
        fused = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                 "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
                 "attn.add_v_proj": ("txt_attn.qkv", 2)}
        if rest in fused:
            name, part = fused[rest]
            return f"{block}.{name}", part, 3
        single = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
                  "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0",
                  "ff_context.linear_out": "txt_mlp.2"}
        return (f"{block}.{single[rest]}", 0, 1) if rest in single else None
    if kind == "single_transformer_blocks":
        single = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
        return (f"single_blocks.{index}.{single[rest]}", 0, 1) if rest in single else None
    return None


# --------------------------------------------------------------------------------------------
# Built-in models


def build(name: str, _clip_tokenizer: Any) -> tuple[dict[str, torch.nn.Module], dict[str, Any], Any, int]:
    """The modules, tokenizers, training schedule and resolution of built-in ``name`` (random weights
    from the current RNG), with the byte-level BPE tokenizer made in this repository."""
    tokenizer = tiny_qwen_tokenizer()
    if name == "tiny-flux2":
        resolution = 64
        # 28 layers (of width 32) so that the stock pipeline's default layers 9, 18 and 27 exist.
        text = qwen3_config(tokenizer, hidden=32, intermediate=64, layers=28, heads=2, kv_heads=1, head_dim=16)
        vae = AutoencoderKLFlux2(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                 norm_num_groups=16, sample_size=resolution)
        transformer = Flux2Transformer2DModel(
            in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
            joint_attention_dim=3 * 32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False)
    elif name == "flux2-klein-arch":
        # FLUX.2 klein 4B: Qwen3-4B, the FLUX.2 VAE (32 latent channels), 5 double + 20 single blocks.
        resolution = 1024
        text = qwen3_config(tokenizer, **QWEN3_4B)
        vae = AutoencoderKLFlux2()
        transformer = Flux2Transformer2DModel(
            in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=3 * QWEN3_4B["hidden"], timestep_guidance_channels=256, mlp_ratio=3.0,
            axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
    else:
        raise KeyError(name)
    # Latent statistics as a trained VAE has them (not the identity of a fresh batch norm), so the
    # normalisation is exercised.
    norm: Any = vae.bn
    channels = norm.running_mean.shape[0]
    norm.running_mean.copy_(0.1 * torch.randn(channels))
    norm.running_var.copy_(1.0 + 0.5 * torch.rand(channels))
    modules: dict[str, torch.nn.Module] = {"text_encoder": Qwen3ForCausalLM(text), "vae": vae,
                                           "transformer": transformer}
    return modules, {"tokenizer": tokenizer}, flow_schedule(**FLUX2_SCHEDULE), resolution

