"""Trained weights: file layout of a run folder, loading them for sampling, and exports.

A finished run folder holds exactly one of:

- ``pytorch_lora_weights.safetensors`` (LoRA, diffusers format, loadable unchanged by the family's
  stock pipeline's ``load_lora_weights(run_dir)``) plus, for families with a kohya-ss format,
  ``lora_kohya.safetensors`` (the same LoRA as AUTOMATIC1111, Forge and ComfyUI load it);
- one ``save_pretrained`` folder per trained module, named as the pipeline names it (``unet/``,
  ``text_encoder/``, ...: a full fine-tune holds only what was trained).

Every function here works for every family: the component names come from the model's family.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from worker.engine.errors import EngineInputError
from worker.engine.families.base import Family
from worker.engine.models import BaseModel

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "lora_kohya.safetensors"
RUN_FILE = "run.json"


def move(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """``module.to(device, dtype)`` in place (diffusers' typed ``to`` wrapper confuses type checkers)."""
    if dtype is None or all(p.dtype == dtype for p in module.parameters()):
        module.to(device)
    else:
        module.to(device=device, dtype=dtype)


def trainable_keys(family: Family) -> tuple[str, ...]:
    """The components a run may train, in the order their weights are saved: denoiser, then text encoders."""
    return (family.denoiser_key, *family.text_encoder_keys)


def read_run_file(run_dir: Path) -> dict[str, Any]:
    """The parsed ``run.json`` of a run folder; raises :class:`EngineInputError` when missing or unreadable."""
    path = Path(run_dir) / RUN_FILE
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise EngineInputError(f"{path} does not exist: {run_dir} is not a finished training run") from None
    except (OSError, ValueError) as exc:
        raise EngineInputError(f"{path} is unreadable: {exc}") from exc


def load_trained_pipeline(model: BaseModel, run_dir: Path) -> Any:
    """The family's sampling pipeline of ``model`` with the weights trained in ``run_dir``, on ``model.device``.

    The base model is never modified: LoRA is loaded into copies of the modules it adapts and fused
    there (so sampling pays nothing for the adapter), and a full fine-tune's folders replace the
    base components. The pipeline is in fp32; wrap sampling in ``torch.autocast`` on a GPU.
    """
    run_dir = Path(run_dir)
    lora_file = run_dir / LORA_WEIGHTS_FILE
    family = model.family
    trained: dict[str, torch.nn.Module] = {}
    if lora_file.is_file():
        trained = _lora_fused_copies(model, lora_file)
    elif (run_dir / family.denoiser_key).is_dir():
        for key in trainable_keys(family):
            folder = run_dir / key
            if not folder.is_dir():
                continue
            module_class: Any = type(model.modules[key])
            try:
                trained[key] = module_class.from_pretrained(str(folder), torch_dtype=torch.float32)
            except (OSError, ValueError) as exc:
                raise EngineInputError(f"could not load the fine-tuned weights in {folder}: {exc}") from exc
    else:
        raise EngineInputError(
            f"{run_dir} holds no trained weights (neither {LORA_WEIGHTS_FILE} nor a {family.denoiser_key}/ folder)"
        )
    pipe = model.pipeline(**trained)
    for part in [*trained.values(), model.vae]:
        part.requires_grad_(False)
        part.eval()
        move(part, model.device)
    return pipe


def _lora_fused_copies(model: BaseModel, lora_file: Path) -> dict[str, torch.nn.Module]:
    """Copies of the modules the LoRA in ``lora_file`` adapts, with its layers merged into their weights."""
    state = load_file(str(lora_file))
    alphas = _lora_alphas_from_metadata(lora_file)
    fused: dict[str, torch.nn.Module] = {}
    for component in trainable_keys(model.family):
        prefix = f"{component}."
        peft_state = {
            _diffusers_key_to_peft(key[len(prefix):]): value for key, value in state.items() if key.startswith(prefix)
        }
        if not peft_state:
            continue
        module = copy.deepcopy(model.modules[component])
        move(module, "cpu", torch.float32)
        if component.startswith("text_encoder"):
            peft_state = {_installed_clip_path(k, module): v for k, v in peft_state.items()}
        rank = next(v.shape[0] for k, v in peft_state.items() if k.endswith("lora_A.weight"))
        # Full module paths as targets: peft then wraps exactly the layers the file has weights for.
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in peft_state})
        alpha = alphas.get(component, float(rank))
        # LoraConfig is annotated with an int alpha; peft computes alpha / r in floats either way.
        config = LoraConfig(r=rank, lora_alpha=cast(int, alpha), target_modules=targets)
        # peft directly, for every module: transformers' own add_adapter refuses peft releases
        # older than the one it was built against.
        inject_adapter_in_model(config, module)
        result = set_peft_model_state_dict(module, peft_state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise EngineInputError(f"{lora_file} does not match the base model: {unexpected[:3]}")
        _merge_lora(module)
        fused[component] = module
    unknown = sorted({key.split(".", 1)[0] for key in state} - set(trainable_keys(model.family)))
    if unknown:
        raise EngineInputError(f"{lora_file} has layers for {', '.join(unknown)}, which a "
                               f"{model.family.label} model does not have")
    return fused


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

    transformers 5 dropped the ``text_model`` level from ``CLIPTextModel`` (not from
    ``CLIPTextModelWithProjection``), so the paths peft reports depend on the installed version and
    the class; files meant for other tools use the classic form.
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
    peft_state = {}
    for key, value in state.items():
        key = _diffusers_key_to_peft(key)
        component, _, path = key.partition(".")
        if component.startswith("text_encoder"):
            key = f"{component}.{_canonical_clip_path(path)}"
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
    return {key.removesuffix(".lora_alpha"): float(value) for key, value in packed.items()
            if key.endswith(".lora_alpha") and value is not None}


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


def lora_deltas_from_kohya(path: Path, family: Family) -> dict[str, torch.Tensor]:
    """The weight change of every layer in a kohya-format LoRA file, keyed as in :func:`lora_deltas_from_diffusers`.

    kohya names flatten module paths with underscores, which is ambiguous in general; this inverse
    is exact for the UNet and CLIP names this engine writes, whose only underscores inside a
    path segment belong to a fixed set of words (down_blocks, to_q, self_attn, ...).
    """
    state = load_file(str(path))
    deltas: dict[str, torch.Tensor] = {}
    # Longest prefixes first: "lora_te1_" must not be read as "lora_te" + "1_...".
    prefixes = sorted(family.kohya_prefixes.items(), key=lambda item: -len(item[1]))
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        flat = key[: -len(".lora_down.weight")]
        up = state[f"{flat}.lora_up.weight"]
        alpha = float(state[f"{flat}.alpha"])
        for component, prefix in prefixes:
            if flat.startswith(prefix):
                module = f"{component}.{_unflatten_kohya_name(flat[len(prefix):])}"
                break
        else:
            raise EngineInputError(f"{path}: key {key!r} has none of the prefixes "
                                   f"{', '.join(family.kohya_prefixes.values())}")
        deltas[module] = (up.float() @ down.float()) * (alpha / down.shape[0])
    return deltas


# Path segments of UNet and CLIP text-encoder module names that contain underscores themselves.
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


def export_kohya_lora(run_dir: Path, family: Family) -> Path:
    """Write ``run_dir/lora_kohya.safetensors``: the run's LoRA in the kohya-ss format of ``family``.

    Each layer becomes ``<prefix><path with _>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``
    with the family's per-component prefixes (``lora_unet_``, ``lora_te_``; SDXL's ``lora_te1_`` and
    ``lora_te2_``), which AUTOMATIC1111, Forge and ComfyUI load.
    """
    run_dir = Path(run_dir)
    lora_file = run_dir / LORA_WEIGHTS_FILE
    if not lora_file.is_file():
        raise EngineInputError(f"{lora_file} does not exist: only LoRA runs can be exported to kohya format")
    if not family.kohya_prefixes:
        raise EngineInputError(f"{family.label} LoRAs have no kohya-ss format")
    alphas = _lora_alphas_from_metadata(lora_file)
    exported: dict[str, torch.Tensor] = {}
    for module, (down, up) in _peft_lora_pairs(load_file(str(lora_file))).items():
        component, _, path = module.partition(".")
        if component not in family.kohya_prefixes:
            raise EngineInputError(f"{lora_file}: LoRA layer {module!r} belongs to none of "
                                   f"{', '.join(family.kohya_prefixes)}")
        flat = family.kohya_prefixes[component] + path.replace(".", "_")
        exported[f"{flat}.lora_down.weight"] = down.contiguous()
        exported[f"{flat}.lora_up.weight"] = up.contiguous()
        exported[f"{flat}.alpha"] = torch.tensor(alphas.get(component, float(down.shape[0])), dtype=torch.float32)
    target = run_dir / KOHYA_LORA_FILE
    partial = run_dir / f".{KOHYA_LORA_FILE}.partial"
    save_file(exported, str(partial), metadata={"format": "pt", "ss_network_module": "networks.lora"})
    partial.replace(target)
    return target
