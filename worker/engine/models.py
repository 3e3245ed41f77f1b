"""Base models: load one of the supported families, or build a built-in one from configuration.

``load_base_model(spec)`` accepts:

- a built-in name (:data:`BUILTIN_MODELS`): ``tiny`` and ``tiny-sdxl`` (a few MB, 64 px, with seeded
  random weights and the small CLIP-format tokenizer shipped in ``assets/tiny-tokenizer``; for tests
  and the CPU demo), ``sd15-arch`` and ``sdxl-arch`` (the real architectures' sizes with seeded
  random weights, for speed and memory measurements: the cost of a step does not depend on the
  values of the weights);
- a local diffusers folder, a single ``.safetensors``/``.ckpt`` file, or a hub id.

The family (:mod:`worker.engine.families`) is detected from what is loaded, never typed. Whatever
the source, the result is a :class:`BaseModel` holding the components, the family that knows how
to use them, and a ``fingerprint`` that identifies the weights in caches (the class-prior bank is
keyed by it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTokenizer

from worker.engine.errors import EngineInputError
from worker.engine.families import BUILTINS, FAMILIES, family_for_pipeline_class, supported_pipelines
from worker.engine.families.base import Family
from worker.engine.families.sd import ARCHITECTURES, SD_SCHEDULE, Architecture, build_components

__all__ = ["ARCHITECTURES", "BUILTIN_MODELS", "SD_SCHEDULE", "Architecture", "BaseModel", "build_builtin",
           "build_components", "fingerprint", "load_base_model", "select_device", "tiny_tokenizer"]

TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny-tokenizer"

# What identifies a model's noise schedule (a saved pipeline may carry any sampler's config), with
# the family's own keys (Family.schedule_keys) beside these.
SCHEDULE_IDENTITY = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "prediction_type")

SAVE_TIME_CONFIG_KEYS = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version"})


@dataclass
class BaseModel:
    """The frozen components of a text-to-image model, ready for training and sampling.

    ``modules`` holds the torch modules under their stock pipeline's component names
    (``unet`` or ``transformer``, ``vae``, ``text_encoder``, ...), ``tokenizers`` the tokenizers;
    ``family`` says how to use them. ``noise_scheduler`` is the schedule the model was trained with.
    """

    spec: str
    family: Family
    modules: dict[str, torch.nn.Module]
    tokenizers: dict[str, Any]
    noise_scheduler: Any
    resolution: int
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    is_demo: bool = False
    source_info: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.modules[self.family.denoiser_key]

    @property
    def unet(self) -> Any:
        """The denoiser of a UNet family (SD, SDXL)."""
        return self.modules["unet"]

    @property
    def vae(self) -> Any:
        return self.modules["vae"]

    @property
    def text_encoder(self) -> Any:
        """The first (or only) text encoder."""
        return self.modules[self.family.text_encoder_keys[0]]

    @property
    def tokenizer(self) -> Any:
        """The first (or only) tokenizer."""
        return self.tokenizers[self.family.tokenizer_keys[0]]

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    def pipeline(self, **parts: torch.nn.Module | None) -> Any:
        """The family's sampling pipeline over these components, with trained ``parts`` replacing some
        (``unet=...``, ``text_encoder=...``; None keeps the base one)."""
        return self.family.pipeline(self, {key: module for key, module in parts.items() if module is not None})


def select_device(prefer: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 (fp16 where bf16 is missing) when present, else CPU with fp32."""
    if prefer == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cuda"), dtype


def device_memory_gb(device: torch.device) -> float | None:
    """The total memory of a CUDA device in GiB; None on the CPU (whose memory the engine does not plan for)."""
    if device.type != "cuda":
        return None
    return float(torch.cuda.get_device_properties(device).total_memory) / 2**30


def tiny_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(
        str(TINY_TOKENIZER_DIR / "vocab.json"), str(TINY_TOKENIZER_DIR / "merges.txt"), model_max_length=77
    )


BUILTIN_MODELS = tuple(BUILTINS)


def build_builtin(name: str, seed: int = 0, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> BaseModel:
    """Construct a built-in model from configuration; the same seed gives identical weights."""
    if name not in BUILTINS:
        raise EngineInputError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    if device is None or dtype is None:
        device, dtype = select_device()
    family_name, builder = BUILTINS[name]
    # Build on the CPU under a private RNG so the weights depend on the seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules, tokenizers, schedule, resolution = builder(name, tiny_tokenizer())
    model = BaseModel(spec=name, family=FAMILIES[family_name], modules=modules, tokenizers=tokenizers,
                      noise_scheduler=schedule, resolution=resolution, fingerprint="", device=device, dtype=dtype,
                      is_demo=True, source_info={"builtin": name, "seed": seed})
    return _finish(model)


def load_base_model(spec: str, *, seed: int = 0, device: torch.device | None = None,
                    dtype: torch.dtype | None = None, cache_dir: str | None = None) -> BaseModel:
    """Load ``spec``: a built-in name, a local diffusers folder, a single weights file, or a hub id.

    Raises :class:`EngineInputError` naming the spec when it cannot be found or loaded, or when it
    is a kind of model no family supports (the message says what it is and what is supported).
    """
    if device is None or dtype is None:
        device, dtype = select_device()
    if spec in BUILTINS:
        return build_builtin(spec, seed=seed, device=device, dtype=dtype)
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise EngineInputError(f"base model folder {spec!r} has no model_index.json (not a diffusers folder)")
            pipe = _load_pretrained(str(path), cache_dir=None)
        elif path.is_file():
            if path.suffix not in {".safetensors", ".ckpt"}:
                raise EngineInputError(f"base model file {spec!r} is not a .safetensors or .ckpt file")
            from worker.engine.single_file import load_single_file

            pipe = load_single_file(path)
        elif "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
            pipe = _load_pretrained(spec, cache_dir=cache_dir)
        else:
            raise EngineInputError(
                f"unknown base model {spec!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), "
                "an existing folder or file, or a hub id like 'owner/name'"
            )
    except EngineInputError:
        raise
    except Exception as exc:  # diffusers raises many kinds: missing files, no network, bad weights
        raise EngineInputError(f"could not load base model {spec!r}: {exc}") from exc
    family = family_for_pipeline_class(type(pipe).__name__)
    if family is None:  # a hub id whose class was only known once loaded
        raise EngineInputError(f"base model {spec!r} is a {type(pipe).__name__}; supported: {supported_pipelines()}")
    modules, tokenizers = family.components_from_pipeline(pipe)
    model = BaseModel(spec=spec, family=family, modules=modules, tokenizers=tokenizers,
                      noise_scheduler=family.training_schedule(pipe.scheduler),
                      resolution=family.resolution_of(modules), fingerprint="", device=device, dtype=dtype,
                      source_info={"source": spec})
    return _finish(model)


def _load_pretrained(source: str, cache_dir: str | None) -> Any:
    """A stock pipeline from a diffusers folder or hub id, after checking its class is a supported family's."""
    from diffusers import DiffusionPipeline

    index: dict[str, Any] = dict(DiffusionPipeline.load_config(source, cache_dir=cache_dir))
    class_name = str(index.get("_class_name"))
    family = family_for_pipeline_class(class_name)
    if family is None:
        raise EngineInputError(f"base model {source!r} is a {class_name}; supported: {supported_pipelines()}")
    extra: dict[str, Any] = {"safety_checker": None} if "safety_checker" in index else {}
    return family.pipeline_class().from_pretrained(source, dtype=torch.float32, cache_dir=cache_dir, **extra)


def _finish(model: BaseModel) -> BaseModel:
    for module in model.modules.values():
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
    for name in model.family.module_keys():
        module: Any = model.modules[name]
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
    config = dict(noise_scheduler.config)
    schedule = {key: config.get(key) for key in (*SCHEDULE_IDENTITY, *model.family.schedule_keys)}
    digest.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]

