"""Trained weights: file layout of a run folder, loading them for sampling, and exports.

A finished run folder holds exactly one of:

- ``pytorch_lora_weights.safetensors`` (LoRA, diffusers format, loadable by stock
  ``StableDiffusionPipeline.load_lora_weights(run_dir)``) plus ``lora_kohya.safetensors`` (the same
  LoRA in the kohya-ss format that AUTOMATIC1111 and ComfyUI load);
- ``unet/`` and, when the text encoder was trained, ``text_encoder/`` (full fine-tune, diffusers
  ``save_pretrained`` folders holding only what was trained).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from worker.engine.errors import EngineInputError
from worker.engine.models import BaseModel

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "lora_kohya.safetensors"
UNET_DIR = "unet"
TEXT_ENCODER_DIR = "text_encoder"
RUN_FILE = "run.json"

# The key prefixes of the two LoRA file formats, per component.
DIFFUSERS_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder."}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


@dataclass
class Components:
    """The base model's components under their precise types.

    ``BaseModel`` annotates them with diffusers' top-level names, which a type checker resolves
    to diffusers' placeholder classes; the engine reads them through this view instead.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    noise_scheduler: DDPMScheduler


def components(model: BaseModel) -> Components:
    return Components(
        unet=cast(UNet2DConditionModel, model.unet),
        vae=cast(AutoencoderKL, model.vae),
        text_encoder=model.text_encoder,
        noise_scheduler=cast(DDPMScheduler, model.noise_scheduler),
    )


def move(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """``module.to(device, dtype)`` in place (diffusers' typed ``to`` wrapper confuses type checkers)."""
    if dtype is None or all(p.dtype == dtype for p in module.parameters()):
        module.to(device)
    else:
        module.to(device=device, dtype=dtype)


def base_pipeline(model: BaseModel, unet: UNet2DConditionModel | None = None,
                  text_encoder: CLIPTextModel | None = None) -> StableDiffusionPipeline:
    """``model.pipeline(...)`` under its precise type."""
    return cast(StableDiffusionPipeline, model.pipeline(unet=cast(Any, unet), text_encoder=text_encoder))


def read_run_file(run_dir: Path) -> dict[str, Any]:
    """The parsed ``run.json`` of a run folder; raises :class:`EngineInputError` when missing or unreadable."""
    path = Path(run_dir) / RUN_FILE
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise EngineInputError(f"{path} does not exist: {run_dir} is not a finished training run") from None
    except (OSError, ValueError) as exc:
        raise EngineInputError(f"{path} is unreadable: {exc}") from exc


def load_trained_pipeline(model: BaseModel, run_dir: Path) -> StableDiffusionPipeline:
    """A DPM-Solver++ pipeline of ``model`` with the weights trained in ``run_dir``, on ``model.device``.

    The base model is never modified: LoRA is loaded into copies of its UNet and text encoder and
    fused there (so sampling pays nothing for the adapter), and a full fine-tune's folders replace
    the base components. The pipeline is in fp32; wrap sampling in ``torch.autocast`` on a GPU.
    """
    run_dir = Path(run_dir)
    lora_file = run_dir / LORA_WEIGHTS_FILE
    if lora_file.is_file():
        unet, text_encoder = _lora_fused_copies(model, lora_file)
    elif (run_dir / UNET_DIR).is_dir():
        try:
            unet = UNet2DConditionModel.from_pretrained(str(run_dir / UNET_DIR), torch_dtype=torch.float32)
            text_encoder = (
                CLIPTextModel.from_pretrained(str(run_dir / TEXT_ENCODER_DIR), torch_dtype=torch.float32)
                if (run_dir / TEXT_ENCODER_DIR).is_dir()
                else components(model).text_encoder
            )
        except (OSError, ValueError) as exc:
            raise EngineInputError(f"could not load the fine-tuned weights in {run_dir}: {exc}") from exc
    else:
        raise EngineInputError(
            f"{run_dir} holds no trained weights (neither {LORA_WEIGHTS_FILE} nor a {UNET_DIR}/ folder)"
        )
    pipe = base_pipeline(model, unet=unet, text_encoder=text_encoder)
    parts: list[torch.nn.Module] = [unet, text_encoder, components(model).vae]
    for part in parts:
        part.requires_grad_(False)
        part.eval()
        move(part, model.device)
    return pipe


def _lora_fused_copies(model: BaseModel, lora_file: Path) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Copies of the base UNet and text encoder with the LoRA in ``lora_file`` merged into their weights.

    The text encoder is copied only when the file has layers for it; otherwise the base one is returned.
    """
    base = components(model)
    state = load_file(str(lora_file))
    unet = copy.deepcopy(base.unet)
    move(unet, "cpu", torch.float32)
    text_encoder = base.text_encoder
    if any(key.startswith(DIFFUSERS_PREFIXES["text_encoder"]) for key in state):
        text_encoder = copy.deepcopy(base.text_encoder)
        move(text_encoder, "cpu", torch.float32)
    alphas = _lora_alphas_from_metadata(lora_file)
    for component, module in (("unet", unet), ("text_encoder", text_encoder)):
        prefix = DIFFUSERS_PREFIXES[component]
        peft_state = {
            _diffusers_key_to_peft(key[len(prefix):]): value for key, value in state.items() if key.startswith(prefix)
        }
        if not peft_state:
            continue
        if component == "text_encoder":
            peft_state = {_installed_clip_path(k, text_encoder): v for k, v in peft_state.items()}
        rank = next(v.shape[0] for k, v in peft_state.items() if k.endswith("lora_A.weight"))
        # Full module paths as targets: peft then wraps exactly the layers the file has weights for.
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in peft_state})
        alpha = alphas.get(component, float(rank))
        # LoraConfig is annotated with an int alpha; peft computes alpha / r in floats either way.
        config = LoraConfig(r=rank, lora_alpha=cast(int, alpha), target_modules=targets)
        # peft directly, for both modules: transformers' own add_adapter refuses peft releases
        # older than the one it was built against.
        inject_adapter_in_model(config, module)
        result = set_peft_model_state_dict(module, peft_state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise EngineInputError(f"{lora_file} does not match the base model: {unexpected[:3]}")
        _merge_lora(module)
    return unet, text_encoder


def _merge_lora(module: torch.nn.Module) -> None:
    """Fold every LoRA layer of ``module`` into its base weight and drop the adapter wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, BaseTunerLayer):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, child.get_base_layer())


def _diffusers_key_to_peft(key: str) -> str:
    """A diffusers-format LoRA key in peft form: ``...to_q.lora.down.weight`` → ``...to_q.lora_A.weight``.

    diffusers writes UNet layers as ``lora.down``/``lora.up`` and CLIP layers as
    ``lora_linear_layer.down``/``up``; peft-format keys pass through unchanged.
    """
    for diffusers_form, peft_form in ((".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."),
                                      (".lora_linear_layer.down.", ".lora_A."),
                                      (".lora_linear_layer.up.", ".lora_B.")):
        key = key.replace(diffusers_form, peft_form)
    return key


def _canonical_clip_path(path: str) -> str:
    """A CLIP text-encoder module path as SD checkpoints and kohya files spell it (``text_model.encoder...``).

    transformers 5 dropped the ``text_model`` level from ``CLIPTextModel``, so the paths peft
    reports depend on the installed version; files meant for other tools use the classic form.
    """
    return path if path.startswith("text_model.") else f"text_model.{path}"


def _installed_clip_path(path: str, text_encoder: torch.nn.Module) -> str:
    """``path`` (either spelling) as a module path of the installed ``text_encoder``."""
    if hasattr(text_encoder, "text_model"):
        return _canonical_clip_path(path)
    return path.removeprefix("text_model.")


def _peft_lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (down, up)}`` from a LoRA state dict in diffusers or peft form.

    Paths keep their component prefix; text-encoder paths are put in the canonical
    ``text_encoder.text_model....`` spelling.
    """
    prefix = DIFFUSERS_PREFIXES["text_encoder"]
    peft_state = {}
    for key, value in state.items():
        key = _diffusers_key_to_peft(key)
        if key.startswith(prefix):
            key = prefix + _canonical_clip_path(key[len(prefix):])
        peft_state[key] = value
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, down in peft_state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            up = peft_state.get(f"{module}.lora_B.weight")
            if up is None:
                raise EngineInputError(f"LoRA layer {module!r} has a down but no up matrix")
            pairs[module] = (down, up)
    return pairs


def _lora_alphas_from_metadata(lora_file: Path) -> dict[str, float]:
    """LoRA alpha per component from the adapter metadata diffusers writes into the file header."""
    with safe_open(str(lora_file), framework="pt") as handle:
        header = handle.metadata() or {}
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return {}
    packed = json.loads(raw)
    alphas: dict[str, float] = {}
    for component, prefix in DIFFUSERS_PREFIXES.items():
        value = packed.get(f"{prefix}lora_alpha")
        if value is not None:
            alphas[component] = float(value)
    return alphas


def lora_deltas_from_diffusers(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weight change ``alpha / rank · up @ down`` of every LoRA layer in the run's diffusers file.

    Keys are ``<component>.<module path>``, e.g. ``unet.down_blocks.0.attentions.0....attn1.to_q``.
    """
    lora_file = Path(run_dir) / LORA_WEIGHTS_FILE
    if not lora_file.is_file():
        raise EngineInputError(f"{lora_file} does not exist: {run_dir} holds no LoRA")
    alphas = _lora_alphas_from_metadata(lora_file)
    deltas: dict[str, torch.Tensor] = {}
    for module, (down, up) in _peft_lora_pairs(load_file(str(lora_file))).items():
        component = module.split(".", 1)[0]
        rank = down.shape[0]
        deltas[module] = (up.float() @ down.float()) * (alphas.get(component, rank) / rank)
    return deltas


def lora_deltas_from_kohya(path: Path) -> dict[str, torch.Tensor]:
    """The weight change of every layer in a kohya-format LoRA file, keyed as in :func:`lora_deltas_from_diffusers`.

    kohya names flatten module paths with underscores, which is ambiguous in general; this inverse
    is exact for the SD UNet and CLIP names this engine writes, whose only underscores inside a
    path segment belong to a fixed set of words (down_blocks, to_q, self_attn, ...).
    """
    state = load_file(str(path))
    deltas: dict[str, torch.Tensor] = {}
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        flat = key[: -len(".lora_down.weight")]
        up = state[f"{flat}.lora_up.weight"]
        alpha = float(state[f"{flat}.alpha"])
        for component, prefix in KOHYA_PREFIXES.items():
            if flat.startswith(prefix):
                module = f"{component}.{_unflatten_kohya_name(flat[len(prefix):])}"
                break
        else:
            raise EngineInputError(f"{path}: key {key!r} has neither the lora_unet_ nor the lora_te_ prefix")
        deltas[module] = (up.float() @ down.float()) * (alpha / down.shape[0])
    return deltas


# Path segments of SD UNet and CLIP text-encoder module names that contain underscores themselves.
_UNDERSCORED_SEGMENTS = (
    "transformer_blocks", "down_blocks", "up_blocks", "mid_block", "text_model", "self_attn",
    "q_proj", "k_proj", "v_proj", "out_proj", "to_q", "to_k", "to_v", "to_out",
)


def _unflatten_kohya_name(flat: str) -> str:
    """``down_blocks_0_attentions_0_..._to_out_0`` → ``down_blocks.0.attentions.0....to_out.0``."""
    protected = flat
    for index, segment in enumerate(_UNDERSCORED_SEGMENTS):
        protected = protected.replace(segment, f"\x00{index}\x00")
    dotted = protected.replace("_", ".")
    for index, segment in enumerate(_UNDERSCORED_SEGMENTS):
        dotted = dotted.replace(f"\x00{index}\x00", segment)
    return dotted


def export_kohya_lora(run_dir: Path) -> Path:
    """Write ``run_dir/lora_kohya.safetensors``: the run's LoRA in the kohya-ss format.

    Each layer becomes ``lora_unet_<path with _>.lora_down.weight``, ``.lora_up.weight`` and
    ``.alpha`` (text-encoder layers use ``lora_te_``), which AUTOMATIC1111 and ComfyUI load for SD 1.x.
    """
    run_dir = Path(run_dir)
    lora_file = run_dir / LORA_WEIGHTS_FILE
    if not lora_file.is_file():
        raise EngineInputError(f"{lora_file} does not exist: only LoRA runs can be exported to kohya format")
    alphas = _lora_alphas_from_metadata(lora_file)
    exported: dict[str, torch.Tensor] = {}
    for module, (down, up) in _peft_lora_pairs(load_file(str(lora_file))).items():
        component, _, path = module.partition(".")
        if component not in KOHYA_PREFIXES:
            raise EngineInputError(
                f"{lora_file}: LoRA layer {module!r} belongs to neither the unet nor the text_encoder")
        flat = KOHYA_PREFIXES[component] + path.replace(".", "_")
        exported[f"{flat}.lora_down.weight"] = down.contiguous()
        exported[f"{flat}.lora_up.weight"] = up.contiguous()
        exported[f"{flat}.alpha"] = torch.tensor(alphas.get(component, float(down.shape[0])), dtype=torch.float32)
    target = run_dir / KOHYA_LORA_FILE
    partial = run_dir / f".{KOHYA_LORA_FILE}.partial"
    save_file(exported, str(partial), metadata={"format": "pt", "ss_network_module": "networks.lora"})
    partial.replace(target)
    return target
