"""The training presets as plain data: base-model family x subject kind x quality -> TrainConfig values.

Torch-free, so the web process can read the step and class-image counts of a recipe (for the time
estimate before a studio starts); :mod:`worker.engine.recipes` builds the validated TrainConfig from
them and explains where the values come from.
"""

from __future__ import annotations

from typing import Any, Literal

Subject = Literal["pet", "person"]
Quality = Literal["fast", "balanced", "best"]
SUBJECTS: tuple[Subject, ...] = ("pet", "person")
QUALITIES: tuple[Quality, ...] = ("fast", "balanced", "best")

# The built-in demo models (random weights, 64 px) paint noise for class priors too: a first studio
# on them takes at most this many (the recipe's 100-300 took three quarters of its time on a CPU),
# unless the caller asks for a number. Real models keep the recipe's count.
DEMO_PRIOR_IMAGES = 40

# Min-SNR-γ with γ = 5 (Hang et al. 2023) speeds convergence and costs nothing.
_SHARED: dict[str, Any] = {"min_snr_gamma": 5.0, "prior_loss_weight": 1.0, "with_prior": True, "batch_size": 1,
                           "lr_warmup_steps": 0}

RECIPES: dict[tuple[Subject, Quality], dict[str, Any]] = {
    # Pets: LoRA on the UNet at the diffusers LoRA anchor; the best preset is the diffusers
    # full fine-tune with prior preservation. A frozen text encoder is enough for animals.
    ("pet", "fast"): {"method": "lora", "rank": 8, "learning_rate": 1e-4, "steps": 300,
                      "num_class_images": 100, "checkpoint_every": 100},
    ("pet", "balanced"): {"method": "lora", "rank": 16, "learning_rate": 1e-4, "steps": 500,
                          "num_class_images": 200, "checkpoint_every": 100},
    ("pet", "best"): {"method": "full", "learning_rate": 5e-6, "steps": 800, "num_class_images": 200,
                      "checkpoint_every": 200},
    # People: faces are judged harshly, so more steps, a higher LoRA rank and a trained text
    # encoder (LoRA on its attention, at half the UNet's lr); the best preset is a full fine-tune
    # of both at the faces' 2e-6 over 1000 steps with a larger prior set.
    ("person", "fast"): {"method": "lora", "rank": 16, "learning_rate": 1e-4, "steps": 500,
                         "train_text_encoder": True, "text_encoder_lr": 5e-5, "num_class_images": 100,
                         "checkpoint_every": 100},
    ("person", "balanced"): {"method": "lora", "rank": 32, "learning_rate": 1e-4, "steps": 800,
                             "train_text_encoder": True, "text_encoder_lr": 5e-5, "num_class_images": 200,
                             "checkpoint_every": 100},
    ("person", "best"): {"method": "full", "learning_rate": 2e-6, "steps": 1000, "train_text_encoder": True,
                         "text_encoder_lr": 2e-6, "num_class_images": 300, "checkpoint_every": 200},
}


# Per family: the presets that differ from SD's, each replacing SD's values for its key.
_SDXL_SHARED: dict[str, Any] = {"resolution": 1024, "offset_noise": 0.0357, "method": "lora", "text_encoder_lr": 5e-6}
FAMILY_RECIPES: dict[str, dict[tuple[Subject, Quality], dict[str, Any]]] = {
    "sdxl": {
        ("pet", "fast"): {**_SDXL_SHARED, "rank": 8, "learning_rate": 1e-4, "steps": 300, "num_class_images": 100,
                          "checkpoint_every": 100},
        ("pet", "balanced"): {**_SDXL_SHARED, "rank": 16, "learning_rate": 1e-4, "steps": 500,
                              "num_class_images": 200, "checkpoint_every": 100},
        ("pet", "best"): {**_SDXL_SHARED, "rank": 32, "learning_rate": 1e-4, "steps": 800, "num_class_images": 200,
                          "train_text_encoder": True, "checkpoint_every": 200},
        ("person", "fast"): {**_SDXL_SHARED, "rank": 16, "learning_rate": 1e-4, "steps": 500,
                             "train_text_encoder": True, "num_class_images": 100, "checkpoint_every": 100},
        ("person", "balanced"): {**_SDXL_SHARED, "rank": 32, "learning_rate": 1e-4, "steps": 800,
                                 "train_text_encoder": True, "num_class_images": 200, "checkpoint_every": 100},
        ("person", "best"): {**_SDXL_SHARED, "rank": 64, "learning_rate": 5e-5, "steps": 1200,
                             "train_text_encoder": True, "num_class_images": 300, "checkpoint_every": 200},
    },
}


def _flow_presets(learning_rate: float) -> dict[tuple[Subject, Quality], dict[str, Any]]:
    shared: dict[str, Any] = {"method": "lora", "min_snr_gamma": None, "offset_noise": 0.0, "resolution": 1024,
                              "train_text_encoder": False, "learning_rate": learning_rate}
    return {
        ("pet", "fast"): {**shared, "rank": 16, "steps": 500, "num_class_images": 100, "checkpoint_every": 100},
        ("pet", "balanced"): {**shared, "rank": 16, "steps": 1000, "num_class_images": 200, "checkpoint_every": 200},
        ("pet", "best"): {**shared, "rank": 32, "steps": 1500, "learning_rate": learning_rate / 2,
                          "num_class_images": 200, "checkpoint_every": 250},
        ("person", "fast"): {**shared, "rank": 16, "steps": 750, "num_class_images": 100, "checkpoint_every": 150},
        ("person", "balanced"): {**shared, "rank": 32, "steps": 1000, "num_class_images": 200,
                                 "checkpoint_every": 200},
        ("person", "best"): {**shared, "rank": 64, "steps": 1500, "learning_rate": learning_rate / 2,
                             "num_class_images": 300, "checkpoint_every": 250},
    }


FAMILY_RECIPES["flux2"] = _flow_presets(4e-4)
FAMILY_RECIPES["zimage"] = _flow_presets(1e-4)


def preset(family: str, key: tuple[Subject, Quality]) -> dict[str, Any]:
    """The values of ``family``'s preset for (subject, quality), SD's for a family with no presets of its own
    (``_SHARED`` not included)."""
    presets = FAMILY_RECIPES.get(family)
    return dict(presets[key]) if presets is not None else dict(RECIPES[key])
