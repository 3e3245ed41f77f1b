"""FLOPs of one DreamBooth training step per model family, counted on the meta device (no GPU, no weights).

The cost of a step depends on the architecture and the shapes, not on the weights' values, so each
built-in is built on PyTorch's meta device (shapes only, no memory) and one step is run under
``torch.utils.flop_counter.FlopCounterMode``: the denoiser's forward and backward on a batch of
1 instance + 1 class example (LoRA: gradients reach the adapters through every layer, but no
frozen weight gets a gradient; full: every weight does). Text embeddings and latents are cached
by the trainer, so the text encoders and the VAE are not part of a step.

    python bench/flops.py [--models sd15-arch,sdxl-arch,flux2-klein-arch,zimage-arch] [--method lora|full]
    python bench/flops.py --weights flux2-klein-arch,zimage-arch    (weight memory, bf16 and int8)

The LLM-encoded families (FLUX.2 klein, Z-Image) count their transformer with the prompt as the
trainer caches it: FLUX.2 klein's 512 padded text tokens, Z-Image's real tokens only (its
unpadding reads the mask's values, so that mask is made on the CPU).

``bench/train.py`` divides these counts by its measured step times for the share of the GPU's
peak that a run reaches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the GPUs the studio is run on, from the
# vendors' datasheets: the denominator of "share of peak".
DENSE_BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by its name, or None for a GPU not in the table."""
    name = device_name.upper()
    for key, value in sorted(DENSE_BF16_PEAK_TFLOPS.items(), key=lambda item: -len(item[0])):
        parts = key.upper().split()
        if all(part in name for part in parts):
            return value
    return None


def training_step_flops(name: str, resolution: int, method: str = "lora", rank: int = 16,
                        prior_source: str = "bank") -> float:
    """FLOPs of one optimizer step's forward and backward for built-in ``name`` at ``resolution``, with
    prior preservation; ``prior_source="base_model"`` adds the frozen model's no-grad forward of the
    instance example that gives the class half its target."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch.utils.flop_counter import FlopCounterMode

    from worker.engine.families import BUILTINS, FAMILIES
    from worker.engine.families.base import ImageMeta, NoisyBatch
    from worker.engine.models import BaseModel, tiny_tokenizer

    family_name, builder = BUILTINS[name]
    family = FAMILIES[family_name]
    meta = torch.device("meta")
    with meta:
        modules, tokenizers, schedule, _ = builder(name, tiny_tokenizer())
    model = BaseModel(spec=name, family=family, modules=modules, tokenizers=tokenizers, noise_scheduler=schedule,
                      resolution=resolution, fingerprint="", device=meta, dtype=torch.bfloat16)
    denoiser: Any = modules[family.denoiser_key]
    for module in modules.values():
        module.requires_grad_(False)
    if method == "lora":
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(family.denoiser_lora_targets)),
                                denoiser)
    else:
        denoiser.requires_grad_(True)
    rows = 2
    prompts = ["a photo of xqz dog", "a photo of a dog"][:rows]
    for key in family.text_encoder_keys:
        # An LLM encoder's SDPA mask asks whether the padding mask is all ones, a value the meta device
        # does not have; the eager mask is built from shapes. (The encoder is not part of a step.)
        config = getattr(modules[key], "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            modules[key].set_attn_implementation("eager")  # type: ignore[operator]
    with torch.no_grad():
        conditioning = dict(family.encode_prompts(model, modules, prompts))
    if "attention_mask" in conditioning and conditioning["attention_mask"].is_meta:
        # Z-Image keeps only the prompt's real tokens, which the meta device cannot tell from padding:
        # the mask is made on the CPU from the chat template with the repo's small tokenizer (17 and 15
        # tokens for the two prompts, near what Qwen3's makes of them, against 4,096 image tokens).
        from worker.engine.families.qwen import chat_tokens

        _, mask = chat_tokens(model.tokenizers["tokenizer"], prompts, enable_thinking=True)
        conditioning["attention_mask"] = mask.float()
    side = resolution // model.vae_scale_factor  # a VAE sample's shape, without running the VAE
    sampled = torch.empty(rows, int(model.vae.config.latent_channels), side, side, device=meta)
    with torch.no_grad():
        latents = family.to_latents(model, sampled)
    objective = family.objective(model, meta, min_snr_gamma=None, offset_noise=0.0)
    noised: NoisyBatch = objective.at_fraction(latents, torch.empty_like(latents), 0.5)
    crops = torch.zeros(rows, 4, device=meta)
    with FlopCounterMode(display=False) as counter:
        if prior_source == "base_model":
            with torch.no_grad():
                first = NoisyBatch(noisy=noised.noisy[:1], timesteps=noised.timesteps[:1], target=noised.target[:1])
                family.predict(model, denoiser, first, {k: v[1:] for k, v in conditioning.items()},
                               ImageMeta(crops[:1]))
        prediction = family.predict(model, denoiser, noised, conditioning, ImageMeta(crops))
        loss = torch.nn.functional.mse_loss(prediction.float(), noised.target.float())
        loss.backward()
    return float(counter.get_total_flops())


def denoiser_weight_bytes(name: str) -> tuple[int, int, int]:
    """Parameters of the built-in's denoiser, and its bytes in bf16 and with the frozen linears in int8
    (worker.engine.quantize, as a LoRA run with ``quantize_base="int8"`` keeps it), on the meta device."""
    import torch

    from worker.engine.families import BUILTINS, FAMILIES
    from worker.engine.models import tiny_tokenizer
    from worker.engine.quantize import quantize_frozen_linears, weight_bytes

    family = FAMILIES[BUILTINS[name][0]]
    with torch.device("meta"):
        modules, _, _, _ = BUILTINS[name][1](name, tiny_tokenizer())
    denoiser = modules[family.denoiser_key].to(torch.bfloat16).requires_grad_(False)
    parameters = sum(parameter.numel() for parameter in denoiser.parameters())
    bf16 = weight_bytes(denoiser)
    quantize_frozen_linears(denoiser)
    return parameters, bf16, weight_bytes(denoiser)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15-arch,sdxl-arch,flux2-klein-arch,zimage-arch",
                        help="comma-separated built-in names")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--prior-source", choices=("bank", "base_model"), default="bank")
    parser.add_argument("--weights", default="", help="comma-separated built-ins: print their denoiser's "
                        "weight memory in bf16 and int8 instead of FLOPs")
    args = parser.parse_args()
    if args.weights:
        print(f"{'model':<18} {'denoiser parameters':>20} {'bf16 GB':>8} {'int8 GB':>8}")
        for name in args.weights.split(","):
            parameters, bf16, int8 = denoiser_weight_bytes(name)
            print(f"{name:<18} {parameters:>20,} {bf16 / 1e9:>8.2f} {int8 / 1e9:>8.2f}")
        return

    from worker.engine.families import BUILTINS, FAMILIES

    header = f"{'model':<18} {'family':<26} {'px':>5} {'method':<6} {'prior':<10} {'TFLOP/step':>11}"
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        family = FAMILIES[BUILTINS[name][0]]
        resolution = family.default_resolution
        flops = training_step_flops(name, resolution, args.method, prior_source=args.prior_source)
        print(f"{name:<18} {family.label:<26} {resolution:>5} {args.method:<6} {args.prior_source:<10} "
              f"{flops / 1e12:>11.2f}")


if __name__ == "__main__":
    main()
