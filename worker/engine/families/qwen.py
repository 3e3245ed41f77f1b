"""What the LLM-conditioned families (FLUX.2 klein, Z-Image) share: the Qwen3 text encoder, its
tokenizer and chat template, the flow-matching schedule, and the ComfyUI LoRA export.

Prompts are wrapped in the tokenizer's chat template as a user turn, padded to a fixed length (the
pipelines' ``max_sequence_length``, 512) and read from hidden layers of the language model. A fixed
length is what lets the trainer cache one conditioning row per prompt and stack them.

The ComfyUI export (:func:`write_comfy_lora`) writes the LoRA under the model's *original* module
names with ComfyUI's ``diffusion_model.`` prefix, which ComfyUI's LoRA loader maps onto any model's
own weights (``comfy/lora.py``, ``model_lora_keys_unet``: every ``diffusion_model.<path>.weight``
is reachable as ``diffusion_model.<path>``), with ``lora_A``/``lora_B`` matrices and the
``alpha / rank`` scale folded into ``lora_B`` (no ``.alpha`` keys: both ComfyUI and diffusers then
use a scale of 1). Where the original model fuses projections that diffusers keeps apart (FLUX.2's
``qkv``, Z-Image's ``attention.qkv``), the separate LoRAs become one exact LoRA of the fused layer:
the down matrices stacked, the up matrices block-diagonal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from transformers import Qwen2Tokenizer, Qwen3Config

from worker.engine.errors import EngineInputError
from worker.engine.families.base import Family, Objective
from worker.engine.families.flow import FlowMatchObjective, FlowShift

if TYPE_CHECKING:
    from worker.engine.models import BaseModel

TINY_QWEN_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-qwen-tokenizer"
MAX_SEQUENCE_LENGTH = 512  # what Flux2KleinPipeline and ZImagePipeline pad prompts to
COMFY_LORA_FILE = "lora_comfyui.safetensors"
# Scheduler settings that identify a flow-matching model's noise schedule (its shift law).
FLOW_SCHEDULE_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                      "max_image_seq_len", "time_shift_type")


class QwenFlowFamily(Family):
    """What FLUX.2 klein and Z-Image share: a Qwen3 text encoder that is never trained, a transformer
    trained with the flow-matching objective under the model's own shift, its LoRA saved through the
    stock pipeline and exported for ComfyUI under the original module names (:func:`write_comfy_lora`)."""

    denoiser_key = "transformer"
    text_encoder_keys = ("text_encoder",)
    tokenizer_keys = ("tokenizer",)
    default_resolution = 1024
    schedule_keys = FLOW_SCHEDULE_KEYS
    latent_multiple = 16  # the VAE's 8× and the 2×2 packing or patches
    sampler_name = "Euler (flow matching)"
    sampler_id = "flow-euler"
    text_encoder_lora_targets = ()
    tokens_per_latent_pixel: ClassVar[float]  # how many transformer tokens one latent pixel makes

    @staticmethod
    def native_name(path: str) -> tuple[str, int, int] | None:
        """The original checkpoint's name of a diffusers module path, with the rows it covers of a fused layer."""
        raise NotImplementedError

    def training_schedule(self, pipe_scheduler: Any) -> Any:
        return FlowMatchEulerDiscreteScheduler.from_config(pipe_scheduler.config)

    def objective(self, model: BaseModel, device: torch.device, *, min_snr_gamma: float | None,
                  offset_noise: float) -> Objective:
        return FlowMatchObjective(device, shift=FlowShift.from_scheduler(model.noise_scheduler.config),
                                  law="logit_normal", tokens_per_latent_pixel=self.tokens_per_latent_pixel,
                                  min_snr_gamma=min_snr_gamma, offset_noise=offset_noise)

    def save_lora(self, folder: Path, layers: Mapping[str, dict[str, torch.Tensor]],
                  metadata: Mapping[str, dict[str, Any]]) -> None:
        save_transformer_lora(self.pipeline_class(), folder, layers, metadata)

    def export_tool_lora(self, run_dir: Path) -> Path | None:
        return write_comfy_lora(run_dir, self.native_name, self.label)


@lru_cache(maxsize=1)
def _tiny_tokenizer_files() -> str:
    if not (TINY_QWEN_TOKENIZER_DIR / "vocab.json").is_file():
        raise EngineInputError(f"{TINY_QWEN_TOKENIZER_DIR} is missing: run scripts/build_tiny_qwen_tokenizer.py")
    return str(TINY_QWEN_TOKENIZER_DIR)


def tiny_qwen_tokenizer() -> Any:
    """The small byte-level BPE tokenizer made in this repository, in Qwen2's format with a chat template."""
    return Qwen2Tokenizer.from_pretrained(_tiny_tokenizer_files())


def qwen3_config(tokenizer: Any, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 head_dim: int, vocab: int | None = None) -> Qwen3Config:
    """A Qwen3 language-model config of the given sizes (``vocab`` defaults to the tokenizer's)."""
    return Qwen3Config(vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, max_position_embeddings=40960,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                       tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)


# Qwen3-4B, the text encoder of FLUX.2 klein 4B and Z-Image (hidden 2560, 36 layers, GQA 32/8).
QWEN3_4B = {"hidden": 2560, "intermediate": 9728, "layers": 36, "heads": 32, "kv_heads": 8, "head_dim": 128,
            "vocab": 151936}


def chat_tokens(tokenizer: Any, prompts: Sequence[str], *, enable_thinking: bool,
                max_length: int = MAX_SEQUENCE_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of each prompt as a user turn of the chat template, padded to ``max_length``."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=enable_thinking)
             for prompt in prompts]
    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return inputs["input_ids"], inputs["attention_mask"]


def flow_schedule(**config: Any) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)


def save_transformer_lora(pipeline_class: Any, folder: Path, layers: Mapping[str, dict[str, torch.Tensor]],
                          metadata: Mapping[str, dict[str, Any]]) -> None:
    """Write a transformer LoRA as the stock pipeline's ``save_lora_weights`` does, in the form its
    ``load_lora_weights`` reads back exactly.

    The layers come in peft form (``lora_A``/``lora_B``, as diffusers' transformer loaders expect;
    the UNet-era ``lora.down``/``lora.up`` spelling is turned back), the ``alpha / rank`` scale is
    folded into ``lora_B``, and no adapter metadata is written: the loader then wraps exactly the
    layers in the file at scale 1. (Metadata would carry ``target_modules`` as name suffixes, and a
    suffix such as FLUX.2's single-block ``attn.to_out`` also names a double block's ModuleList.)
    """
    from worker.engine.weights import _diffusers_key_to_peft

    arguments: dict[str, Any] = {}
    for key, state in layers.items():
        rank = int(metadata[key]["r"])
        scale = float(metadata[key].get("lora_alpha") or rank) / rank
        peft_state = {_diffusers_key_to_peft(name): value for name, value in state.items()}
        arguments[f"{key}_lora_layers"] = {name: value * scale if ".lora_B." in name else value
                                           for name, value in peft_state.items()}
    pipeline_class.save_lora_weights(str(folder), **arguments)


# --------------------------------------------------------------------------------------------
# The ComfyUI export

# diffusers module path (inside the transformer) → (original path, index among the fused parts,
# number of fused parts); None: the layer has no counterpart and cannot be exported.
NativeName = Callable[[str], tuple[str, int, int] | None]


def write_comfy_lora(run_dir: Path, native_name: NativeName, label: str) -> Path:
    """Write ``run_dir/lora_comfyui.safetensors`` from the run's diffusers LoRA (see the module docstring)."""
    from safetensors.torch import load_file

    from worker.engine.weights import LORA_WEIGHTS_FILE, _lora_alphas_from_metadata, _peft_lora_pairs

    lora_file = Path(run_dir) / LORA_WEIGHTS_FILE
    if not lora_file.is_file():
        raise EngineInputError(f"{lora_file} does not exist: only LoRA runs can be exported for ComfyUI")
    alphas = _lora_alphas_from_metadata(lora_file)
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    parts_of: dict[str, int] = {}
    for module, (down, up) in _peft_lora_pairs(load_file(str(lora_file))).items():
        component, _, path = module.partition(".")
        target = native_name(path) if component == "transformer" else None
        if target is None:
            raise EngineInputError(f"{lora_file}: LoRA layer {module!r} has no counterpart in a {label} "
                                   "checkpoint as ComfyUI loads it")
        name, index, parts = target
        scale = alphas.get(component, float(down.shape[0])) / down.shape[0]
        fused.setdefault(name, {})[index] = (down.float(), up.float() * scale)
        parts_of[name] = parts
    exported: dict[str, torch.Tensor] = {}
    for name, pieces in sorted(fused.items()):
        parts = parts_of[name]
        if sorted(pieces) != list(range(parts)):
            raise EngineInputError(f"{lora_file}: the fused layer {name!r} has LoRA on only some of its "
                                   f"{parts} projections; train all of them or none")
        downs = [pieces[i][0] for i in range(parts)]
        ups = [pieces[i][1] for i in range(parts)]
        exported[f"diffusion_model.{name}.lora_A.weight"] = torch.cat(downs).contiguous()
        exported[f"diffusion_model.{name}.lora_B.weight"] = torch.block_diag(*ups).contiguous()
    target_file = Path(run_dir) / COMFY_LORA_FILE
    partial = Path(run_dir) / f".{COMFY_LORA_FILE}.partial"
    save_file(exported, str(partial), metadata={"format": "pt", "studio_export": json.dumps({"for": "ComfyUI",
                                                                                             "model": label})})
    partial.replace(target_file)
    return target_file


def comfy_lora_deltas(path: Path) -> dict[str, torch.Tensor]:
    """The weight change ``lora_B @ lora_A`` of every layer of a ComfyUI export, keyed by original path."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    deltas = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
            up = state[key.replace(".lora_A.weight", ".lora_B.weight")]
            deltas[name] = up.float() @ down.float()
    return deltas
