"""Base models: load Stable Diffusion 1.x/2.x, or build a built-in one from configuration.

``load_base_model(spec)`` accepts:

- ``"tiny"``: a few-MB, 64 px pipeline with seeded random weights and the small CLIP-format
  tokenizer shipped in ``assets/tiny-tokenizer``; for tests and the CPU demo.
- ``"sd15-arch"``: the real SD 1.5 architecture (UNet, VAE, CLIP ViT-L/14 text encoder sizes) with
  seeded random weights; for speed and memory measurements, since the cost of a step does not
  depend on the values of the weights.
- a local diffusers folder, a single ``.safetensors``/``.ckpt`` file, or a hub id.

Whatever the source, the result is a :class:`BaseModel` holding the components and a
``fingerprint`` that identifies the weights in caches (the class-prior bank is keyed by it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from worker.engine.errors import EngineInputError

TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny-tokenizer"

# The noise schedule every SD 1.x checkpoint was trained with.
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


# What identifies a model's noise schedule (a saved pipeline may carry any sampler's config).
SCHEDULE_IDENTITY = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "prediction_type")

SAVE_TIME_CONFIG_KEYS = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version"})


@dataclass
class BaseModel:
    """The frozen components of a text-to-image model, ready for training and sampling."""

    spec: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    resolution: int
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    is_demo: bool = False
    source_info: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        vae: Any = self.vae  # diffusers registers ``config`` at run time; mypy cannot see it
        return int(2 ** (len(vae.config.block_out_channels) - 1))

    def pipeline(self, unet: UNet2DConditionModel | None = None,
                 text_encoder: CLIPTextModel | None = None) -> StableDiffusionPipeline:
        """A sampling pipeline on DPM-Solver++ over these components (or trained replacements)."""
        noise_scheduler: Any = self.noise_scheduler
        scheduler = DPMSolverMultistepScheduler.from_config(
            noise_scheduler.config, algorithm_type="dpmsolver++", steps_offset=1
        )
        pipe: Any = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=text_encoder or self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet or self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def select_device(prefer: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 (fp16 where bf16 is missing) when present, else CPU with fp32."""
    if prefer == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cuda"), dtype


def tiny_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(
        str(TINY_TOKENIZER_DIR / "vocab.json"), str(TINY_TOKENIZER_DIR / "merges.txt"), model_max_length=77
    )


@dataclass(frozen=True)
class Architecture:
    """The sizes of a built-in model. The layer types are SD 1.x's: a CLIP text encoder, a VAE with
    8x downsampling, and a UNet whose levels all have cross-attention but the deepest."""

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
BUILTIN_MODELS = tuple(ARCHITECTURES)


def build_components(arch: Architecture, tokenizer: CLIPTokenizer
                     ) -> tuple[CLIPTextModel, AutoencoderKL, UNet2DConditionModel]:
    """Text encoder, VAE and UNet of ``arch`` with random weights from the current RNG, in that order."""
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=arch.text_vocab or len(tokenizer),
            hidden_size=arch.text_width,
            intermediate_size=arch.text_intermediate,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=arch.text_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae_levels = len(arch.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        block_out_channels=arch.vae_channels,
        layers_per_block=arch.vae_layers,
        latent_channels=4,
        norm_num_groups=arch.vae_groups,
        sample_size=arch.resolution,
    )
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


def build_builtin(name: str, seed: int = 0, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> BaseModel:
    """Construct a built-in model from configuration; the same seed gives identical weights."""
    if name not in BUILTIN_MODELS:
        raise EngineInputError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    if device is None or dtype is None:
        device, dtype = select_device()
    tokenizer = tiny_tokenizer()
    arch = ARCHITECTURES[name]
    # Build on the CPU under a private RNG so the weights depend on the seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder, vae, unet = build_components(arch, tokenizer)
    model = BaseModel(
        spec=name,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=DDPMScheduler(**SD_SCHEDULE),
        resolution=arch.resolution,
        fingerprint="",
        device=device,
        dtype=dtype,
        is_demo=True,
        source_info={"builtin": name, "seed": seed},
    )
    return _finish(model)


def load_base_model(spec: str, *, seed: int = 0, device: torch.device | None = None,
                    dtype: torch.dtype | None = None, cache_dir: str | None = None) -> BaseModel:
    """Load ``spec``: a built-in name, a local diffusers folder, a single weights file, or a hub id.

    Raises :class:`EngineInputError` naming the spec when it cannot be found or loaded.
    """
    if device is None or dtype is None:
        device, dtype = select_device()
    if spec in BUILTIN_MODELS:
        return build_builtin(spec, seed=seed, device=device, dtype=dtype)
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise EngineInputError(f"base model folder {spec!r} has no model_index.json (not a diffusers folder)")
            pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, dtype=torch.float32)
        elif path.is_file():
            if path.suffix not in {".safetensors", ".ckpt"}:
                raise EngineInputError(f"base model file {spec!r} is not a .safetensors or .ckpt file")
            pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, dtype=torch.float32)
        elif "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
            pipe = StableDiffusionPipeline.from_pretrained(
                spec, safety_checker=None, dtype=torch.float32, cache_dir=cache_dir
            )
        else:
            raise EngineInputError(
                f"unknown base model {spec!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), "
                "an existing folder or file, or a hub id like 'owner/name'"
            )
    except EngineInputError:
        raise
    except Exception as exc:  # diffusers raises many kinds: missing files, no network, bad weights
        raise EngineInputError(f"could not load base model {spec!r}: {exc}") from exc
    resolution = int(pipe.unet.config.sample_size) * int(2 ** (len(pipe.vae.config.block_out_channels) - 1))
    model = BaseModel(
        spec=spec,
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        resolution=resolution,
        fingerprint="",
        device=device,
        dtype=dtype,
        source_info={"source": spec},
    )
    return _finish(model)


def _finish(model: BaseModel) -> BaseModel:
    modules: tuple[Any, ...] = (model.text_encoder, model.vae, model.unet)
    for module in modules:
        module.requires_grad_(False)
        module.eval()
    model.fingerprint = fingerprint(model)
    return model


def fingerprint(model: BaseModel) -> str:
    """A short hash of the configs and a strided sample of every weight tensor.

    Hashing every byte of a 2 GB checkpoint would cost seconds at every job start; a sample of
    each tensor tells checkpoints apart just as well, since fine-tunes change every tensor.
    """
    digest = hashlib.sha256()
    named: tuple[tuple[str, Any], ...] = (
        ("text_encoder", model.text_encoder), ("vae", model.vae), ("unet", model.unet)
    )
    for name, module in named:
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        # Keys that describe how a config was made or saved, not the model: private ones
        # (diffusers' "_use_default_values" is even ordered by the process's string hashing) and
        # the ones transformers adds when saving.
        config = {key: value for key, value in config.items()
                  if not key.startswith("_") and key not in SAVE_TIME_CONFIG_KEYS}
        digest.update(name.encode())
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for key, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // 64)
            sample = flat[::stride][:64].to(torch.float32).cpu().numpy().tobytes()
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample)
    noise_scheduler: Any = model.noise_scheduler
    # Only the noise schedule the model was trained with; the sampler is chosen per use.
    schedule = {key: dict(noise_scheduler.config).get(key) for key in SCHEDULE_IDENTITY}
    digest.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
