"""Prior preservation measured: the class bank against the bank-free mode against none, per family.

For each tiny built-in, three LoRA runs from the same seed on the same 4 photos (``--steps`` steps):
classic prior preservation with the base model's own class images from the bank, bank-free
preservation (``prior_source="base_model"``), and no preservation. For each it prints:

- instance loss: the denoising loss of the subject's photos under the instance prompt (fixed noise
  and noise levels; lower: the subject is learned), relative to the base model's;
- class fit: the denoising loss of the class images under the class prompt;
- class drift: how far the class prompt's predictions moved from the base model's on those images
  (``worker.engine.train.prediction_drift``; 0: unchanged);
- the cost: CPU seconds of the training call, and the class images the bank had to make.

    python bench/preservation.py [--models tiny,tiny-sdxl] [--steps 40] [--class-images 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(name: str, steps: int, class_images: int) -> list[dict[str, object]]:
    import torch

    from tests.worker.engine.conftest import make_subject_photo
    from worker.engine.models import build_builtin
    from worker.engine.priors import fill_prior_bank
    from worker.engine.train import TrainConfig, denoising_loss, prediction_drift, train
    from worker.engine.weights import load_trained_pipeline

    torch.set_num_threads(1)
    model = build_builtin(name, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    instance_prompt, class_prompt = "a photo of xqz dog", "a photo of a dog"
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        photos = [make_subject_photo(folder / f"photo{i}.jpg", seed=i) for i in range(4)]
        started = time.process_time()
        bank = fill_prior_bank(model, folder / "bank", class_prompt, class_images, resolution=model.resolution,
                               steps=model.family.sample_steps).images
        bank_seconds = time.process_time() - started
        base_fit = denoising_loss(model, photos, instance_prompt, resolution=model.resolution)
        settings = {"steps": steps, "resolution": model.resolution, "rank": 8, "learning_rate": 4e-3}
        for mode, extra, classes in (("bank", {}, bank), ("base_model", {"prior_source": "base_model"}, []),
                                     ("none", {"with_prior": False}, [])):
            run_dir = folder / mode
            started = time.process_time()
            train(model, TrainConfig(**settings, **extra), instance_images=photos,  # type: ignore[arg-type]
                  instance_prompt=instance_prompt, class_images=classes, class_prompt=class_prompt, run_dir=run_dir)
            seconds = time.process_time() - started
            denoiser = getattr(load_trained_pipeline(model, run_dir), model.family.denoiser_key)
            rows.append({
                "model": name, "mode": mode, "cpu_seconds": seconds,
                "bank_images": len(bank) if mode == "bank" else 0,
                "bank_cpu_seconds": bank_seconds if mode == "bank" else 0.0,
                "instance_loss": denoising_loss(model, photos, instance_prompt, resolution=model.resolution,
                                                denoiser=denoiser) / base_fit,
                "class_fit": denoising_loss(model, bank, class_prompt, resolution=model.resolution, denoiser=denoiser),
                "class_drift": prediction_drift(model, bank, class_prompt, resolution=model.resolution,
                                                denoiser=denoiser),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,tiny-sdxl")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--class-images", type=int, default=4)
    args = parser.parse_args()
    header = (f"{'model':<10} {'preservation':<12} {'instance loss':>13} {'class fit':>9} {'class drift':>11} "
              f"{'train CPU s':>11} {'bank images':>11} {'bank CPU s':>10}")
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        for row in measure(name, args.steps, args.class_images):
            print(f"{row['model']:<10} {row['mode']:<12} {row['instance_loss']:>13.3f} {row['class_fit']:>9.4f} "
                  f"{row['class_drift']:>11.4f} {row['cpu_seconds']:>11.1f} {row['bank_images']:>11} "
                  f"{row['bank_cpu_seconds']:>10.1f}")


if __name__ == "__main__":
    main()
