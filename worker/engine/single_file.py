"""Single-file checkpoints in the original layout: load them with no network, and write them.

A "single file" is what model sites hand out: one ``.safetensors`` (or legacy ``.ckpt``) holding the
UNet, VAE and text encoder(s) under the key names of the original training code (``ldm`` for SD
1.x/2.x, ``sgm`` for SDXL): ``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*`` or ``conditioner.embedders.N.*``. It carries no configuration and no
tokenizer.

:func:`load_single_file` tells the kind of file from its tensor names and shapes alone (no weight is
read for that), then lets diffusers convert the weights using the small configuration folders
shipped in ``families/configs`` (instead of fetching them from the Hugging Face hub, which is what
makes ``from_single_file`` fail offline). Supported: SD 1.x, SD 2.x (768 px, v-prediction) and
SDXL base. Everything else is refused with an :class:`EngineInputError` that says what the file
appears to be.

:func:`save_single_file` writes a diffusers SD 1.x or SDXL pipeline in that original layout, which
AUTOMATIC1111, ComfyUI and diffusers' own ``from_single_file`` read.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from worker.engine.errors import EngineInputError

CONFIG_ROOT = Path(__file__).parent / "families" / "configs"

# The one tokenizer every supported kind uses: OpenCLIP's BPE vocabulary is OpenAI CLIP's, so the
# OpenCLIP text encoders (SD 2.x, SDXL's second) take the same files with "!" (id 0) as padding.
CLIP_TOKENIZER_REPO = "openai/clip-vit-large-patch14"
CLIP_PAD = "<|endoftext|>"
OPEN_CLIP_PAD = "!"
CLIP_CONTEXT = 77  # tokens: every SD text encoder's context

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class SingleFileKind:
    """A supported kind of single file: its configuration folder, pipeline and tokenizers."""

    name: str  # diffusers' name for the kind ("v1", "v2", "xl_base")
    label: str
    config: str  # folder under CONFIG_ROOT
    pipeline: str  # diffusers pipeline class
    parts: tuple[tuple[str, str], ...]  # (key prefix in the file, what it is) that must all be present
    tokenizers: tuple[tuple[str, str], ...]  # (pipeline component, padding token)


KINDS: dict[str, SingleFileKind] = {
    "v1": SingleFileKind(
        name="v1", label="Stable Diffusion 1.x", config="sd15", pipeline="StableDiffusionPipeline",
        parts=((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), (SD1_CLIP_PREFIX, "CLIP text encoder")),
        tokenizers=(("tokenizer", CLIP_PAD),),
    ),
    "v2": SingleFileKind(
        name="v2", label="Stable Diffusion 2.x (768 px, v-prediction)", config="sd21",
        pipeline="StableDiffusionPipeline",
        parts=((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), (SD2_OPEN_CLIP_PREFIX, "OpenCLIP text encoder")),
        tokenizers=(("tokenizer", OPEN_CLIP_PAD),),
    ),
    "xl_base": SingleFileKind(
        name="xl_base", label="Stable Diffusion XL base", config="sdxl", pipeline="StableDiffusionXLPipeline",
        parts=((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), (SDXL_CLIP_PREFIX, "CLIP text encoder"),
               (SDXL_OPEN_CLIP_PREFIX, "OpenCLIP text encoder")),
        tokenizers=(("tokenizer", CLIP_PAD), ("tokenizer_2", OPEN_CLIP_PAD)),
    ),
}
SUPPORTED = ", ".join(kind.label for kind in KINDS.values())

# Names for what diffusers recognises but we do not load, by the start of diffusers' model type.
_DIFFUSERS_LABELS: tuple[tuple[str, str], ...] = (
    ("xl_refiner", "a Stable Diffusion XL refiner"),
    ("xl_inpaint", "a Stable Diffusion XL inpainting model"),
    ("inpainting_v2", "a Stable Diffusion 2.x inpainting model"),
    ("inpainting", "a Stable Diffusion 1.x inpainting model"),
    ("playground", "a Playground v2.5 model (SDXL architecture, EDM noise schedule)"),
    ("upscale", "a Stable Diffusion x4 upscaler"),
    ("controlnet", "a ControlNet"),
    ("sd3", "a Stable Diffusion 3 model"),
    ("sd35", "a Stable Diffusion 3.5 model"),
    ("flux", "a FLUX model"),
    ("chroma", "a Chroma model (FLUX architecture)"),
    ("z-image", "a Z-Image model"),
    ("animatediff", "an AnimateDiff motion module"),
    ("instruct-pix2pix", "an InstructPix2Pix model"),
    ("stable_cascade", "a Stable Cascade model"),
    ("auraflow", "an AuraFlow model"),
    ("lumina", "a Lumina model"),
    ("sana", "a Sana model"),
    ("hidream", "a HiDream model"),
    ("qwen", "a Qwen-Image model"),
    ("ltx", "an LTX-Video model"),
    ("wan", "a Wan video model"),
    ("hunyuan", "a HunyuanVideo model"),
    ("mochi", "a Mochi video model"),
    ("cosmos", "a Cosmos model"),
    ("autoencoder-dc", "a DC-AE autoencoder"),
)


# ---------------------------------------------------------------------------------------------
# Reading and identifying a file


def read_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a checkpoint file, without reading the weights.

    ``.safetensors``: from the header. ``.ckpt``: unpickled with ``weights_only`` (no code in the
    file ever runs) onto the meta device; a nested ``state_dict`` is unwrapped as diffusers does.
    Raises :class:`EngineInputError` naming the file when it cannot be read.
    """
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise EngineInputError(f"{path.name} is not a readable .safetensors file: {exc}") from exc
    try:
        loaded: Any = torch.load(path, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # pickle errors, or objects weights_only refuses
        raise EngineInputError(
            f"{path.name} could not be read as a weights-only PyTorch checkpoint (code in a .ckpt is never run; "
            f"convert it to .safetensors): {exc}"
        ) from exc
    while isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise EngineInputError(f"{path.name} holds a {type(loaded).__name__}, not a dictionary of weights")
    return {str(key): tuple(value.shape) for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def identify_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str | None, str]:
    """``(kind, description)`` of a checkpoint from its tensor names and shapes.

    ``kind`` is a key of :data:`KINDS` when the file is a complete checkpoint of a supported kind,
    else ``None``; ``description`` says in words what the file appears to be. The rules look at the
    structure (which components are present, the UNet's input channels), not at sizes, so they hold
    for the tiny models of the tests as for the real ones.
    """
    if not shapes:
        return None, "an empty checkpoint (it holds no tensors)"
    if _looks_like_lora(shapes):
        return None, "a LoRA (low-rank changes to another model's weights, not a model of its own)"
    if "edm_mean" in shapes:
        return None, "a Playground v2.5 model (SDXL architecture, EDM noise schedule)"
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and not _has(shapes, "control_model."):
        return _identify_original_sd(shapes, conv_in)
    return None, _describe_other(shapes)


def _has(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


def _looks_like_lora(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    markers = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_unet_", "lora_te", ".hada_w", ".lokr_w")
    return any(marker in key for key in shapes for marker in markers)


def _identify_original_sd(shapes: Mapping[str, tuple[int, ...]], conv_in: tuple[int, ...]) -> tuple[str | None, str]:
    if _has(shapes, SDXL_REFINER_OPEN_CLIP_PREFIX) and not _has(shapes, SDXL_CLIP_PREFIX):
        return None, "a Stable Diffusion XL refiner (it has only the OpenCLIP text encoder)"
    if _has(shapes, SDXL_CLIP_PREFIX) or _has(shapes, SDXL_OPEN_CLIP_PREFIX):
        kind = KINDS["xl_base"]
    elif _has(shapes, SD2_OPEN_CLIP_PREFIX):
        kind = KINDS["v2"]
    elif _has(shapes, SD1_CLIP_PREFIX):
        kind = KINDS["v1"]
    else:
        return None, "a UNet in the original Stable Diffusion layout with no text encoder (not a full checkpoint)"
    channels = conv_in[1] if len(conv_in) == 4 else None
    if channels == 9:
        return None, f"a {kind.label} inpainting model (its UNet takes 9 input channels)"
    if channels == 8:
        return None, f"an InstructPix2Pix-style {kind.label} model (its UNet takes 8 input channels)"
    if channels != 4:
        return None, f"a {kind.label}-like model whose UNet takes {channels} input channels instead of 4"
    missing = [what for prefix, what in kind.parts if not _has(shapes, prefix)]
    if missing:
        return None, f"an incomplete {kind.label} checkpoint (it has no {' and no '.join(missing)})"
    return kind.name, f"a {kind.label} checkpoint"


def _describe_other(shapes: Mapping[str, tuple[int, ...]]) -> str:
    model_type = _diffusers_model_type(shapes)
    if model_type is not None and model_type != "v1":  # diffusers answers "v1" for anything it does not know
        for start, label in _DIFFUSERS_LABELS:
            if model_type.startswith(start):
                return f"{label} (diffusers identifies it as {model_type!r})"
        return f"a {model_type!r} model (diffusers' name for it)"
    if "conv_in.weight" in shapes and _has(shapes, "down_blocks."):
        return "a single model in diffusers' own layout, not a full checkpoint (load its diffusers folder instead)"
    if _has(shapes, "encoder.down.") and _has(shapes, "decoder.up."):
        return "a standalone VAE, not a full checkpoint"
    if _has(shapes, "text_model.") or _has(shapes, "transformer.resblocks."):
        return "a standalone text encoder, not a full checkpoint"
    names = sorted(shapes)
    sample = ", ".join(repr(name) for name in names[:3])
    return f"not a Stable Diffusion checkpoint (its {len(names)} tensors are named like {sample})"


def _diffusers_model_type(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """diffusers' own guess at the model type, fed meta tensors of the file's shapes (no weights)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    fake = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    try:
        return str(infer_diffusers_model_type(fake))
    except Exception:  # its rules index keys they did not check for; any failure means "unknown"
        return None


# ---------------------------------------------------------------------------------------------
# Loading


def load_single_file(path: Path, *, tokenizers: Mapping[str, Any] | None = None,
                     config_dir: Path | None = None) -> Any:
    """Load a single-file SD 1.x, SD 2.x or SDXL-base checkpoint into a stock diffusers pipeline.

    Returns a ``StableDiffusionPipeline`` (SD 1.x/2.x) or ``StableDiffusionXLPipeline`` (SDXL), in
    float32 on the CPU, with no safety checker or watermarker. The network is never used for the
    model: the configuration comes from the folder shipped for the kind detected, or ``config_dir``
    when given (a diffusers folder's configs, without weights; it must be for the same pipeline).

    ``tokenizers`` maps the pipeline's tokenizer components (``"tokenizer"``, and
    ``"tokenizer_2"`` for SDXL) to tokenizer objects; the ones not given are the standard CLIP
    tokenizer from the Hugging Face cache (``openai/clip-vit-large-patch14``), which is downloaded
    once when the hub is reachable and looked up locally only when ``HF_HUB_OFFLINE`` is set.

    Raises :class:`EngineInputError` when the file is missing or unreadable, is not a supported kind
    (the message says what it appears to be and lists the supported kinds), does not fit the
    configuration, or when a tokenizer cannot be found.
    """
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise EngineInputError(f"{path.name} is not a .safetensors or .ckpt file")
    if not path.is_file():
        raise EngineInputError(f"checkpoint file {path} does not exist")
    shapes = read_tensor_shapes(path)
    kind_name, description = identify_checkpoint(shapes)
    if kind_name is None:
        raise EngineInputError(f"{path.name} appears to be {description}; supported single files: {SUPPORTED}")
    kind = KINDS[kind_name]
    folder = Path(config_dir) if config_dir is not None else CONFIG_ROOT / kind.config
    _check_config_folder(folder, kind)
    components = _tokenizers_for(kind, tokenizers)

    import diffusers

    pipeline_class = getattr(diffusers, kind.pipeline)
    if kind.pipeline == "StableDiffusionXLPipeline":
        options: dict[str, Any] = {"add_watermarker": False}
    else:
        options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        # No dtype: diffusers then casts each weight to its module's (float32, on the CPU). With a
        # dtype it would also cast what the file lacks, which fails on the meta device with a bare
        # "Cannot copy out of meta tensor"; the except below names the missing weights instead.
        pipe = pipeline_class.from_single_file(
            str(path), config=str(folder), local_files_only=True, **components, **options
        )
    except Exception as exc:  # diffusers raises many kinds: shape mismatches, unreadable files
        try:
            missing = sorted(set(expected_tensor_shapes(kind, folder)) - set(shapes))
        except Exception:  # a configuration diffusers could not use either; its own error says why
            missing = []
        reason = (f"the file lacks {len(missing)} of the weights it needs, e.g. {', '.join(missing[:3])} ({exc})"
                  if missing else str(exc))
        raise EngineInputError(
            f"could not load {path.name} as {kind.label} with the configuration in {folder}: {reason}"
        ) from exc
    _check_loaded(pipe, path, kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def expected_tensor_shapes(kind: SingleFileKind, folder: Path) -> dict[str, tuple[int, ...]]:
    """The tensors a file of ``kind`` holds for the configuration in ``folder``, by name, with shapes.

    Built on the meta device, so it costs no memory at any size. For SD 2.x the OpenCLIP encoder's
    last layer and projection, which diffusers does not use, are not listed.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        tensors = {UNET_PREFIX + key: value for key, value in unet_to_original(unet).items()}
        tensors.update({VAE_PREFIX + key: value for key, value in vae_to_original(vae).items()})
        if kind.name == "v1":
            tensors.update(clip_to_original(text_encoder, SD1_CLIP_PREFIX))
        elif kind.name == "v2":
            tensors.update(open_clip_to_original(text_encoder, SD2_OPEN_CLIP_PREFIX))
        else:
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            tensors.update(clip_to_original(text_encoder, SDXL_CLIP_PREFIX))
            tensors.update(open_clip_to_original(text_encoder_2, SDXL_OPEN_CLIP_PREFIX))
    return {key: tuple(value.shape) for key, value in tensors.items()}


def _check_config_folder(folder: Path, kind: SingleFileKind) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        raise EngineInputError(f"configuration folder {folder} has no model_index.json")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise EngineInputError(f"{index} is not readable JSON: {exc}") from exc
    if class_name != kind.pipeline:
        raise EngineInputError(
            f"configuration folder {folder} is for a {class_name}, but the file is {kind.label} ({kind.pipeline})"
        )


def _tokenizers_for(kind: SingleFileKind, given: Mapping[str, Any] | None) -> dict[str, Any]:
    given = dict(given or {})
    wanted = [name for name, _ in kind.tokenizers]
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        raise EngineInputError(
            f"tokenizers {', '.join(unknown)} do not belong to {kind.label}, whose tokenizers are {', '.join(wanted)}"
        )
    return {name: given[name] if name in given else standard_tokenizer(pad) for name, pad in kind.tokenizers}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now (huggingface_hub reads it only once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def standard_tokenizer(pad_token: str = CLIP_PAD) -> Any:
    """The CLIP tokenizer of SD checkpoints, from the Hugging Face cache (or the hub when online).

    Built from the repository's ``vocab.json`` and ``merges.txt`` with CLIP's 77-token context:
    ``CLIPTokenizer.from_pretrained`` would, when the files are missing from the cache, quietly
    return a tokenizer knowing three tokens. Raises :class:`EngineInputError` naming the
    repository and how to fetch it when the files cannot be found.
    """
    from huggingface_hub import hf_hub_download
    from transformers import CLIPTokenizer

    offline = hub_offline()
    try:
        vocab, merges = (hf_hub_download(CLIP_TOKENIZER_REPO, name, local_files_only=offline)
                         for name in ("vocab.json", "merges.txt"))
    except Exception as exc:  # the hub's "not in the cache" and connection errors
        where = ("is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline
                 else "could not be downloaded")
        raise EngineInputError(
            f"the CLIP tokenizer {CLIP_TOKENIZER_REPO!r}, which single-file checkpoints do not contain, {where} "
            f"({exc}). Fetch it once on a machine with network (hf download {CLIP_TOKENIZER_REPO} vocab.json "
            "merges.txt), or pass the tokenizers to the loader."
        ) from exc
    return CLIPTokenizer(vocab, merges, model_max_length=CLIP_CONTEXT, pad_token=pad_token)


def _check_loaded(pipe: Any, path: Path, kind: SingleFileKind) -> None:
    """diffusers leaves weights the file lacks on the meta device instead of failing; fail here."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        empty = [key for key, tensor in module.state_dict().items() if tensor.device.type == "meta"]
        if empty:
            raise EngineInputError(
                f"{path.name} lacks {len(empty)} {name} weights that {kind.label} needs, e.g. {', '.join(empty[:3])}"
            )


# ---------------------------------------------------------------------------------------------
# Writing


def save_single_file(pipe: Any, path: Path) -> Path:
    """Write a diffusers SD 1.x or SDXL pipeline as one ``.safetensors`` in the original layout.

    SD 1.x: ``model.diffusion_model.*``, ``first_stage_model.*`` and
    ``cond_stage_model.transformer.*``. SDXL: the same UNet and VAE names,
    ``conditioner.embedders.0.transformer.*`` (CLIP) and ``conditioner.embedders.1.model.*``
    (OpenCLIP: fused ``in_proj`` attention, transposed ``text_projection``). Tensors keep their
    dtype. The noise schedule buffers of the original training code are not written: no loader
    needs them. The file appears whole or not at all (written aside, then renamed).

    Raises :class:`EngineInputError` for a pipeline of another kind (SD 2.x's text encoder lacks the
    last layer the original layout holds, so it cannot be written) or a weight with no place in
    the original layout.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise EngineInputError(f"{path.name}: single files are written as .safetensors")
    tensors = original_state_dict(pipe)
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def original_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder weights under the original layout's names."""
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    tensors = {UNET_PREFIX + key: value for key, value in unet_to_original(pipe.unet).items()}
    tensors.update({VAE_PREFIX + key: value for key, value in vae_to_original(pipe.vae).items()})
    if text_encoder_2 is not None:
        if pipe.unet.config.addition_embed_type != "text_time":
            raise EngineInputError("cannot write this pipeline: an SDXL pipeline's UNet must take text_time embeddings")
        tensors.update(clip_to_original(pipe.text_encoder, SDXL_CLIP_PREFIX))
        tensors.update(open_clip_to_original(text_encoder_2, SDXL_OPEN_CLIP_PREFIX))
    else:
        if pipe.text_encoder.config.hidden_act != "quick_gelu":
            raise EngineInputError(
                "cannot write this pipeline in the original layout: its text encoder is not SD 1.x's CLIP "
                "(SD 2.x's OpenCLIP encoder lacks the last layer the original file holds); "
                "single files are written for SD 1.x and SDXL"
            )
        tensors.update(clip_to_original(pipe.text_encoder, SD1_CLIP_PREFIX))
    return tensors


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@dataclass(frozen=True)
class _Place:
    """Where a diffusers module goes in the original layout, and how its inner names change."""

    prefix: str
    inner: Mapping[str, str] | None = None
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None


def _rename(component: str, state: Mapping[str, torch.Tensor], places: Mapping[str, _Place]
            ) -> dict[str, torch.Tensor]:
    """Move each weight to the place of the longest module prefix it starts with."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        place: _Place | None = None
        rest: list[str] = []
        for cut in range(len(parts) - 1, 0, -1):
            place = places.get(".".join(parts[:cut]) + ".")
            if place is not None:
                rest = parts[cut:]
                break
        if place is None:
            raise EngineInputError(f"cannot write {component} weight {key!r}: it has no place in the original layout")
        name = ".".join(rest)
        for old, new in (place.inner or {}).items():
            if name.startswith(old + "."):
                name = new + name[len(old):]
                break
        out[place.prefix + name] = place.transform(name, tensor) if place.transform else tensor
    return out


def unet_to_original(unet: Any) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel``'s weights under ``ldm``'s names (without ``model.diffusion_model.``).

    The original UNet numbers its blocks in one sequence per direction: ``input_blocks`` (the input
    convolution, then per level ``layers`` blocks of a resnet and maybe a transformer, then a
    downsampler but at the deepest level), the ``middle_block``, and ``output_blocks`` (per level
    ``layers + 1`` blocks, the last of each level but the top ending in an upsampler).
    """
    config = unet.config
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise EngineInputError("cannot write a UNet whose levels have different numbers of layers")
    levels = len(config.block_out_channels)
    down_attention = [block.startswith("CrossAttn") for block in config.down_block_types]
    up_attention = [block.startswith("CrossAttn") for block in config.up_block_types]
    places: dict[str, _Place] = {
        "conv_in.": _Place("input_blocks.0.0."),
        "time_embedding.linear_1.": _Place("time_embed.0."),
        "time_embedding.linear_2.": _Place("time_embed.2."),
        "add_embedding.linear_1.": _Place("label_emb.0.0."),
        "add_embedding.linear_2.": _Place("label_emb.0.2."),
        "mid_block.resnets.0.": _Place("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": _Place("middle_block.1."),
        "mid_block.resnets.1.": _Place("middle_block.2.", _UNET_RESNET),
        "conv_norm_out.": _Place("out.0."),
        "conv_out.": _Place("out.2."),
    }
    for level in range(levels):
        for layer in range(layers):
            block = 1 + level * (layers + 1) + layer
            places[f"down_blocks.{level}.resnets.{layer}."] = _Place(f"input_blocks.{block}.0.", _UNET_RESNET)
            if down_attention[level]:
                places[f"down_blocks.{level}.attentions.{layer}."] = _Place(f"input_blocks.{block}.1.")
        if level < levels - 1:
            downsampler = (level + 1) * (layers + 1)
            places[f"down_blocks.{level}.downsamplers.0.conv."] = _Place(f"input_blocks.{downsampler}.0.op.")
        for layer in range(layers + 1):
            block = level * (layers + 1) + layer
            places[f"up_blocks.{level}.resnets.{layer}."] = _Place(f"output_blocks.{block}.0.", _UNET_RESNET)
            if up_attention[level]:
                places[f"up_blocks.{level}.attentions.{layer}."] = _Place(f"output_blocks.{block}.1.")
        if level < levels - 1:
            last = level * (layers + 1) + layers
            index = 2 if up_attention[level] else 1
            places[f"up_blocks.{level}.upsamplers.0.conv."] = _Place(f"output_blocks.{last}.{index}.conv.")
    return _rename("UNet", unet.state_dict(), places)


def _attention_as_conv(name: str, tensor: torch.Tensor) -> torch.Tensor:
    # The original VAE's attention projections are 1x1 convolutions; diffusers' are linear layers.
    if name.endswith(".weight") and tensor.dim() == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def vae_to_original(vae: Any) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL``'s weights under ``ldm``'s names (without ``first_stage_model.``).

    The original decoder numbers its levels from the lowest resolution up, the reverse of diffusers.
    """
    config = vae.config
    levels = len(config.block_out_channels)
    places: dict[str, _Place] = {name + ".": _Place(name + ".") for name in (
        "encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        places[f"{side}.conv_norm_out."] = _Place(f"{side}.norm_out.")
        places[f"{side}.mid_block.resnets.0."] = _Place(f"{side}.mid.block_1.", _VAE_RESNET)
        places[f"{side}.mid_block.resnets.1."] = _Place(f"{side}.mid.block_2.", _VAE_RESNET)
        places[f"{side}.mid_block.attentions.0."] = _Place(f"{side}.mid.attn_1.", _VAE_ATTENTION, _attention_as_conv)
    for level in range(levels):
        for layer in range(config.layers_per_block):
            places[f"encoder.down_blocks.{level}.resnets.{layer}."] = _Place(
                f"encoder.down.{level}.block.{layer}.", _VAE_RESNET)
        places[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = _Place(f"encoder.down.{level}.downsample.conv.")
        original = levels - 1 - level
        for layer in range(config.layers_per_block + 1):
            places[f"decoder.up_blocks.{level}.resnets.{layer}."] = _Place(
                f"decoder.up.{original}.block.{layer}.", _VAE_RESNET)
        places[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = _Place(f"decoder.up.{original}.upsample.conv.")
    return _rename("VAE", vae.state_dict(), places)


def clip_to_original(text_encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel``'s weights under ``prefix + "text_model."`` (its own names)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in text_encoder.state_dict().items():
        name = key.removeprefix("text_model.")
        if not name.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            raise EngineInputError(f"cannot write text encoder weight {key!r}: SD's CLIP text encoder has no such part")
        out[f"{prefix}text_model.{name}"] = tensor
    return out


_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_original(text_encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's weights in OpenCLIP's layout under ``prefix``.

    OpenCLIP keeps each layer's query, key and value projections as one ``in_proj`` matrix (in
    that order) and stores ``text_projection`` as the transpose of a linear layer's weight.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in text_encoder.state_dict().items():
        name = key.removeprefix("text_model.")
        layer = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if name == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = tensor
        elif name == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = tensor
        elif name.startswith("final_layer_norm."):
            out[prefix + "ln_final." + name.removeprefix("final_layer_norm.")] = tensor
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif layer is not None and layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault((layer[1], layer[3]), {})[layer[2].removeprefix("self_attn.")[0]] = tensor
        elif layer is not None and layer[2] in _OPEN_CLIP_LAYER:
            out[f"{prefix}transformer.resblocks.{layer[1]}.{_OPEN_CLIP_LAYER[layer[2]]}.{layer[3]}"] = tensor
        else:
            raise EngineInputError(f"cannot write text encoder weight {key!r} in OpenCLIP's layout")
    for (index, kind), projections in fused.items():
        if set(projections) != {"q", "k", "v"}:
            raise EngineInputError(f"text encoder layer {index} lacks some of its query, key and value {kind}s")
        out[f"{prefix}transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(
            [projections["q"], projections["k"], projections["v"]])
    return out
