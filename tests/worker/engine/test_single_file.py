"""Single files in the original layout: written by save_single_file, read back offline by load_single_file.

Every test that loads runs under the ``offline`` fixture: HF_HUB_OFFLINE=1, and any socket
connection or hub download fails the test, so a pass proves nothing was fetched.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import worker.engine
from worker.engine import single_file
from worker.engine.errors import EngineInputError
from worker.engine.single_file import (
    CONFIG_ROOT,
    KINDS,
    SUPPORTED,
    clip_to_original,
    identify_checkpoint,
    load_single_file,
    open_clip_to_original,
    save_single_file,
    unet_to_original,
    vae_to_original,
)

TOKENIZER_DIR = Path(worker.engine.__file__).parent / "assets" / "tiny-tokenizer"
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "steps_offset": 1}


# ---------------------------------------------------------------------------------------------
# Fixtures and tiny models


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[str]]:
    """HF_HUB_OFFLINE=1, an empty Hugging Face cache, and no network: every attempt is recorded and fails.

    Hub downloads asked for with ``local_files_only=True`` are cache look-ups and go through; a
    socket connection or any other download fails and fails the test.
    """
    attempts: list[str] = []

    def refuse(what: str, original: Any = None) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            if original is not None and kwargs.get("local_files_only") is True:
                return original(*args, **kwargs)
            attempts.append(f"{what}{args[:2]}")
            raise OSError(f"network access in a test: {what}")
        return refused

    import diffusers.loaders.single_file as diffusers_single_file
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.file_download
    import transformers.utils.hub

    # The hub reads its variables once, at import: set them, and what a process started with them sees.
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))

    for module, name in ((huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download"),
                         (huggingface_hub.file_download, "hf_hub_download"),
                         (diffusers_single_file, "snapshot_download"),
                         (transformers.utils.hub, "hf_hub_download")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}", getattr(module, name)))
    yield attempts
    assert attempts == [], f"the code tried to reach the network: {attempts}"


def tiny_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=77, pad_token=pad_token)


def text_config(tokenizer: CLIPTokenizer, width: int, layers: int, act: str, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                          hidden_act=act, projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_vae(channels: tuple[int, ...], layers: int) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=layers,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels),
                         latent_channels=4, norm_num_groups=16, sample_size=64)


def tiny_sd1(seed: int) -> StableDiffusionPipeline:
    """SD 1.x's structure at a few MB: CLIP text encoder, 8x VAE, 3-level UNet with one layer per level."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(tokenizer, 32, 2, "quick_gelu", 32))
        vae = tiny_vae((16, 32, 32, 32), 1)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe


def tiny_sd2(seed: int) -> StableDiffusionPipeline:
    """SD 2.x's structure: an OpenCLIP-type text encoder (gelu), linear projections, v-prediction."""
    tokenizer = tiny_tokenizer("!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(tokenizer, 48, 2, "gelu", 16))
        vae = tiny_vae((16, 32), 1)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=48, attention_head_dim=(4, 8), use_linear_projection=True, norm_num_groups=32)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl(seed: int) -> StableDiffusionXLPipeline:
    """SDXL's structure: CLIP plus an OpenCLIP encoder with projection, text_time UNet, deep transformers."""
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer("!")
    time_dim, pooled = 8, 24
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(tokenizer, 32, 2, "quick_gelu", 32))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, 64, 3, "gelu", pooled))
        vae = tiny_vae((16, 32, 32), 2)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            cross_attention_dim=32 + 64, attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=pooled + 6 * time_dim, norm_num_groups=32)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="leading"),
        add_watermarker=False)


def configs_only(pipe: Any, folder: Path) -> Path:
    """The pipeline saved with save_pretrained, less its weights and tokenizer files."""
    pipe.save_pretrained(folder)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / name, ignore_errors=True)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    return folder


def assert_same_weights(expected: Any, actual: Any) -> None:
    wanted, got = expected.state_dict(), actual.state_dict()
    assert sorted(wanted) == sorted(got)
    for key, tensor in wanted.items():
        assert got[key].device.type == "cpu" and got[key].dtype == torch.float32, key
        assert torch.equal(tensor, got[key]), key


def sample(pipe: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        images = pipe("a photo of a dog", height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
                      generator=generator, output_type="np").images
    return np.asarray(images)


def file_keys(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_round_trips_through_the_original_layout(offline: list[str], tmp_path: Path, suffix: str) -> None:
    pipe = tiny_sd1(seed=1)
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    keys = file_keys(path)
    assert all(key.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for key in keys)
    assert keys["first_stage_model.encoder.mid.attn_1.q.weight"] == (32, 32, 1, 1)
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in keys  # the upsampler after a plain level
    assert "model.diffusion_model.output_blocks.3.2.conv.weight" in keys  # ... and after a cross-attention level
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    if suffix == ".ckpt":  # legacy pickles, read with weights_only; the weights nest under "state_dict"
        with safe_open(str(path), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        # ... next to what the original training code saved besides: its noise schedule, EMA
        # bookkeeping and CLIP's position ids. Loaders ignore these.
        state.update({"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
                      "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": state, "global_step": 10}, path)

    loaded = load_single_file(path, tokenizers={"tokenizer": pipe.tokenizer},
                              config_dir=configs_only(pipe, tmp_path / "config"))

    assert type(loaded) is StableDiffusionPipeline
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipe, name), getattr(loaded, name))
    assert loaded.safety_checker is None
    np.testing.assert_array_equal(sample(loaded), sample(pipe))


def test_sdxl_round_trips_through_the_original_layout(offline: list[str], tmp_path: Path) -> None:
    pipe = tiny_sdxl(seed=2)
    path = save_single_file(pipe, tmp_path / "xl.safetensors")
    keys = file_keys(path)
    open_clip = "conditioner.embedders.1.model."
    assert keys[open_clip + "transformer.resblocks.0.attn.in_proj_weight"] == (3 * 64, 64)
    assert keys[open_clip + "transformer.resblocks.2.attn.in_proj_bias"] == (3 * 64,)
    assert keys[open_clip + "text_projection"] == (64, 24)  # OpenCLIP stores the transpose of the linear weight
    assert keys[open_clip + "positional_embedding"] == (77, 64)
    assert not any("q_proj" in key for key in keys if key.startswith(open_clip))
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight" in keys
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys  # upsampler after a cross-attention level

    loaded = load_single_file(path, tokenizers={"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2},
                              config_dir=configs_only(pipe, tmp_path / "config"))

    assert type(loaded) is StableDiffusionXLPipeline
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(pipe, name), getattr(loaded, name))
    np.testing.assert_array_equal(sample(loaded), sample(pipe))


def sd2_original(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """An SD 2.x file as the original code writes it: OpenCLIP with one layer more than diffusers keeps."""
    prefix = "cond_stage_model.model."
    state = {"model.diffusion_model." + key: value for key, value in unet_to_original(pipe.unet).items()}
    state.update({"first_stage_model." + key: value for key, value in vae_to_original(pipe.vae).items()})
    text = open_clip_to_original(pipe.text_encoder, prefix)
    last = pipe.text_encoder.config.num_hidden_layers
    for key, value in list(text.items()):
        if key.startswith(f"{prefix}transformer.resblocks.{last - 1}."):
            text[key.replace(f".resblocks.{last - 1}.", f".resblocks.{last}.")] = torch.randn_like(value)
    width = pipe.text_encoder.config.hidden_size
    text[prefix + "text_projection"] = torch.randn(width, width)
    state.update(text)
    return {key: value.detach().contiguous() for key, value in state.items()}


def test_sd2_file_loads_with_its_v_prediction_configuration(offline: list[str], tmp_path: Path) -> None:
    pipe = tiny_sd2(seed=3)
    path = tmp_path / "v2.safetensors"
    save_file(sd2_original(pipe), str(path))

    loaded = load_single_file(path, tokenizers={"tokenizer": pipe.tokenizer},
                              config_dir=configs_only(pipe, tmp_path / "config"))

    assert type(loaded) is StableDiffusionPipeline
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipe, name), getattr(loaded, name))


def test_the_writer_refuses_what_it_cannot_write_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(EngineInputError, match="SD 1.x and SDXL"):
        save_single_file(tiny_sd2(seed=0), tmp_path / "v2.safetensors")
    with pytest.raises(EngineInputError, match=r"\.safetensors"):
        save_single_file(tiny_sd1(seed=0), tmp_path / "model.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_half_precision_file_loads_in_float32(offline: list[str], tmp_path: Path) -> None:
    pipe = tiny_sd1(seed=9)
    state = single_file.original_state_dict(pipe)
    path = tmp_path / "half.safetensors"
    save_file({key: value.detach().half().contiguous() for key, value in state.items()}, str(path))

    loaded = load_single_file(path, tokenizers={"tokenizer": pipe.tokenizer},
                              config_dir=configs_only(pipe, tmp_path / "config"))

    for name in ("unet", "vae", "text_encoder"):
        rounded = getattr(pipe, name).half().float()
        assert_same_weights(rounded, getattr(loaded, name))


# ---------------------------------------------------------------------------------------------
# The shipped configurations


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def shipped(family: str) -> dict[str, Any]:
    """The components of a shipped configuration at full size, on the meta device (no memory)."""
    folder = CONFIG_ROOT / family
    index = json.loads((folder / "model_index.json").read_text())
    with torch.device("meta"):
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        }
        for name in ("text_encoder", "text_encoder_2"):
            if name in index:
                projected = index[name][1] == "CLIPTextModelWithProjection"
                model_class = CLIPTextModelWithProjection if projected else CLIPTextModel
                parts[name] = model_class(CLIPTextConfig.from_pretrained(folder / name))
    return parts


def test_shipped_configurations_have_the_real_sizes() -> None:
    sd15, sd21, sdxl = shipped("sd15"), shipped("sd21"), shipped("sdxl")
    assert {name: count(module) for name, module in sd15.items()} == {
        "unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    # SD 2.1: OpenCLIP ViT-H/14's text tower less its last layer (23 of 24, width 1024), as diffusers keeps it.
    assert {name: count(module) for name, module in sd21.items()} == {
        "unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}
    # SDXL: CLIP ViT-L/14 plus OpenCLIP ViT-bigG/14's text tower (32 layers, width 1280, 1280x1280 projection).
    assert {name: count(module) for name, module in sdxl.items()} == {
        "unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    assert json.loads((CONFIG_ROOT / "sd21/scheduler/scheduler_config.json").read_text())["prediction_type"] == (
        "v_prediction")
    for family in ("sd15", "sd21", "sdxl"):  # configs only: tokenizers and weights never ship
        files = sorted(str(path.relative_to(CONFIG_ROOT / family)) for path in (CONFIG_ROOT / family).rglob("*")
                       if path.is_file())
        assert all(name.endswith(".json") for name in files), files


def full_size_file(family: str) -> dict[str, torch.Tensor]:
    """The tensors (on the meta device) of a full-size file of the family, named as the original code names them."""
    parts = shipped(family)
    state = {"model.diffusion_model." + key: value for key, value in unet_to_original(parts["unet"]).items()}
    state.update({"first_stage_model." + key: value for key, value in vae_to_original(parts["vae"]).items()})
    if family == "sd15":
        state.update(clip_to_original(parts["text_encoder"], "cond_stage_model.transformer."))
    elif family == "sdxl":
        state.update(clip_to_original(parts["text_encoder"], "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_original(parts["text_encoder_2"], "conditioner.embedders.1.model."))
    else:
        text = open_clip_to_original(parts["text_encoder"], "cond_stage_model.model.")
        text.update({key.replace(".resblocks.22.", ".resblocks.23."): value for key, value in text.items()
                     if ".resblocks.22." in key})
        text["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device="meta")
        state.update(text)
    return state


@pytest.mark.parametrize(("family", "kind"), [("sd15", "v1"), ("sd21", "v2"), ("sdxl", "xl_base")])
def test_each_shipped_configuration_takes_a_full_size_file_of_its_kind(family: str, kind: str) -> None:
    """Detection and diffusers' conversion, on meta tensors: a real file of the kind fits the folder exactly."""
    state = full_size_file(family)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert identify_checkpoint(shapes)[0] == kind
    assert KINDS[kind].config == family
    # diffusers' own rule agrees at full size (its rules look for layer numbers tiny models do not have).
    assert single_file_utils.infer_diffusers_model_type(state) == kind

    parts = shipped(family)
    converted = {
        "unet": single_file_utils.convert_ldm_unet_checkpoint(state, dict(parts["unet"].config)),
        "vae": single_file_utils.convert_ldm_vae_checkpoint(state, dict(parts["vae"].config)),
    }
    if family == "sd21":
        text = single_file_utils.convert_open_clip_checkpoint(parts["text_encoder"], state, "cond_stage_model.model.")
        converted["text_encoder"] = {key.removeprefix("text_model."): value for key, value in text.items()}
    else:
        clip = single_file_utils.convert_ldm_clip_checkpoint(state)
        converted["text_encoder"] = {key.removeprefix("text_model."): value for key, value in clip.items()}
    if family == "sdxl":
        converted["text_encoder_2"] = single_file_utils.convert_open_clip_checkpoint(
            parts["text_encoder_2"], state, "conditioner.embedders.1.model.")
    for name, weights in converted.items():
        expected = {key: tuple(value.shape) for key, value in parts[name].state_dict().items()}
        assert {key: tuple(value.shape) for key, value in weights.items() if key in expected} == expected, name


# ---------------------------------------------------------------------------------------------
# Bad input


def write(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return path


SD1_SKELETON = {
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,),
}


@pytest.mark.parametrize(("shapes", "named"), [
    ({**SD1_SKELETON, "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3)},
     "Stable Diffusion 1.x inpainting"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (8,),
      "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight": (8,)}, "XL refiner"),
    ({key: shape for key, shape in SD1_SKELETON.items() if "first_stage" not in key}, "incomplete .* no VAE"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (8,), "img_in.weight": (8, 64)}, "FLUX"),
    ({"joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), "pos_embed": (1, 36864, 4)},
     "Stable Diffusion 3"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (8, 4),
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "LoRA"),
    ({"conv_in.weight": (8, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)}, "diffusers' own layout"),
    ({"foo.weight": (2,), "bar": (3, 3)}, "not a Stable Diffusion checkpoint .* 'bar', 'foo.weight'"),
])
def test_unsupported_files_say_what_they_are_and_what_is_supported(
        offline: list[str], tmp_path: Path, shapes: dict[str, tuple[int, ...]], named: str) -> None:
    path = write(tmp_path / "model.safetensors", shapes)
    with pytest.raises(EngineInputError, match=named) as raised:
        load_single_file(path, tokenizers={"tokenizer": tiny_tokenizer()})
    assert SUPPORTED in str(raised.value) and "model.safetensors" in str(raised.value)


def test_unreadable_files_are_named(offline: list[str], tmp_path: Path) -> None:
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(EngineInputError, match="broken.safetensors is not a readable .safetensors file"):
        load_single_file(garbage)
    pickle_with_code = tmp_path / "code.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callback": Path("x")}, pickle_with_code)
    with pytest.raises(EngineInputError, match="code.ckpt could not be read as a weights-only"):
        load_single_file(pickle_with_code)
    with pytest.raises(EngineInputError, match="does not exist"):
        load_single_file(tmp_path / "absent.safetensors")
    with pytest.raises(EngineInputError, match="not a .safetensors or .ckpt"):
        load_single_file(tmp_path / "model.bin")


def test_a_configuration_of_another_kind_or_size_is_refused(offline: list[str], tmp_path: Path) -> None:
    pipe = tiny_sd1(seed=4)
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    with pytest.raises(EngineInputError, match="is for a StableDiffusionXLPipeline"):
        load_single_file(path, tokenizers={"tokenizer": pipe.tokenizer}, config_dir=CONFIG_ROOT / "sdxl")
    # The shipped SD 1.5 folder is the right kind but the wrong size for a tiny file: named, not a crash.
    with pytest.raises(EngineInputError, match="could not load model.safetensors as Stable Diffusion 1.x"):
        load_single_file(path, tokenizers={"tokenizer": pipe.tokenizer})
    with pytest.raises(EngineInputError, match="tokenizer_2 do not belong to Stable Diffusion 1.x"):
        load_single_file(path, tokenizers={"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer})


@pytest.mark.parametrize(("absent", "named"), [
    ("model.diffusion_model.out.2.weight", "lacks 1 of the weights it needs, e.g. model.diffusion_model.out.2.weight"),
    ("first_stage_model.decoder.up.0.block.0.conv1.bias",
     "lacks 1 of the weights it needs, e.g. first_stage_model.decoder.up.0.block.0.conv1.bias"),
    # diffusers leaves a text encoder weight the file lacks on the meta device without a word.
    ("cond_stage_model.transformer.text_model.final_layer_norm.bias", "lacks 1 text_encoder weights"),
])
def test_a_file_missing_weights_is_refused(offline: list[str], tmp_path: Path, absent: str, named: str) -> None:
    pipe = tiny_sd1(seed=5)
    state = single_file.original_state_dict(pipe)
    del state[absent]
    path = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    with pytest.raises(EngineInputError, match=named):
        load_single_file(path, tokenizers={"tokenizer": pipe.tokenizer}, config_dir=configs_only(pipe, tmp_path / "c"))


# ---------------------------------------------------------------------------------------------
# Tokenizers from the Hugging Face cache


def test_a_missing_tokenizer_offline_is_named(offline: list[str], tmp_path: Path) -> None:
    pipe = tiny_sd1(seed=6)
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    with pytest.raises(EngineInputError, match="openai/clip-vit-large-patch14.* HF_HUB_OFFLINE is set"):
        load_single_file(path, config_dir=configs_only(pipe, tmp_path / "config"))


def cache_tokenizer(hub_cache: Path) -> None:
    """Put a CLIP tokenizer where the hub's cache keeps openai/clip-vit-large-patch14 (the tiny vocabulary)."""
    repo = hub_cache / "models--openai--clip-vit-large-patch14"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / name, snapshot / name)


def test_tokenizers_come_from_the_local_cache_offline(offline: list[str], tmp_path: Path) -> None:
    cache_tokenizer(tmp_path / "hf-home" / "hub")
    pipe = tiny_sdxl(seed=8)
    path = save_single_file(pipe, tmp_path / "xl.safetensors")

    loaded = load_single_file(path, config_dir=configs_only(pipe, tmp_path / "config"))

    assert loaded.tokenizer.pad_token == "<|endoftext|>" and loaded.tokenizer_2.pad_token == "!"
    assert loaded.tokenizer.model_max_length == loaded.tokenizer_2.model_max_length == 77
    assert loaded.tokenizer.get_vocab() == loaded.tokenizer_2.get_vocab() == pipe.tokenizer.get_vocab()
    np.testing.assert_array_equal(sample(loaded), sample(pipe))


def test_tokenizers_are_downloaded_once_when_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE the files are asked of the hub (which keeps them in its cache)."""
    import huggingface_hub
    import huggingface_hub.constants

    asked: list[tuple[str, str, bool]] = []

    def download(repo: str, filename: str, *, local_files_only: bool = False) -> str:
        asked.append((repo, filename, local_files_only))
        return str(TOKENIZER_DIR / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)

    tokenizer = single_file.standard_tokenizer(single_file.OPEN_CLIP_PAD)

    assert asked == [("openai/clip-vit-large-patch14", "vocab.json", False),
                     ("openai/clip-vit-large-patch14", "merges.txt", False)]
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0 and tokenizer.model_max_length == 77
