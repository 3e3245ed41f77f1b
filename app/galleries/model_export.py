"""The trained model as downloads, to use outside the studio.

A LoRA studio offers its LoRA as diffusers' ``load_lora_weights`` loads it and, when its family
has one (the worker writes ``lora_kohya.safetensors`` only then), as AUTOMATIC1111 and ComfyUI load
it (kohya-ss names); every studio offers all its weights files as one ZIP (the only form of a full
fine-tune: diffusers folders). What is offered follows the files the worker published, never the
family's name. With them go what a person needs to use the model: the base model to load it on (its
name, family and licence) and the words that call up the subject ("qzx dog").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from app.galleries.service import ZipEntry, iter_zip, slugify
from app.models import Subject, utcnow
from app.storage import Storage
from app.subjects.base_models import ModelFacts, model_facts

DownloadVariant = Literal["a1111", "diffusers", "zip"]

# The file names worker/engine/weights.py writes into a run folder (a test keeps them in step).
KOHYA_LORA_FILE = "lora_kohya.safetensors"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


class NoTrainedModel(LookupError):
    """The studio has no model yet, or not in the asked form."""


@dataclass(frozen=True)
class ModelDownload:
    variant: DownloadVariant
    label: str
    filename: str
    storage_key: str | None  # None for the ZIP, which is built from every weights file


@dataclass(frozen=True)
class TrainedModel:
    method: Literal["lora", "full"]
    base_model: str
    demo_model: bool
    trigger: str  # the words that call up the subject in a prompt, "qzx dog"
    downloads: list[ModelDownload]
    files: dict[str, str]  # name in the run folder -> storage key
    base_model_info: ModelFacts | None = None  # its name, family and licence

    def download(self, variant: DownloadVariant) -> ModelDownload:
        for download in self.downloads:
            if download.variant == variant:
                return download
        raise NoTrainedModel("This studio's model has no download of that kind (a full fine-tune is only a ZIP).")


def trained_model(subject: Subject) -> TrainedModel | None:
    """What the studio's model is and how it can be downloaded; None until training published it."""
    if subject.weights_key is None:
        return None
    info: dict[str, Any] = dict(subject.model_info or {})
    names = [str(name) for name in info.get("weights_files") or []]
    files = {name: subject.weights_key + name for name in names}
    stem = f"{slugify(subject.name, fallback='studio')}-{subject.identifier or 'model'}"
    downloads: list[ModelDownload] = []
    if KOHYA_LORA_FILE in files:
        downloads.append(ModelDownload("a1111", "LoRA for AUTOMATIC1111 and ComfyUI", f"{stem}.safetensors",
                                       files[KOHYA_LORA_FILE]))
    if DIFFUSERS_LORA_FILE in files:
        downloads.append(ModelDownload("diffusers", "LoRA for diffusers", f"{stem}-diffusers.safetensors",
                                       files[DIFFUSERS_LORA_FILE]))
    downloads.append(ModelDownload("zip", "Every weights file (ZIP)", f"{stem}-model.zip", None))
    trigger = " ".join(part for part in (subject.identifier, subject.class_noun) if part)
    return TrainedModel(
        method="lora" if DIFFUSERS_LORA_FILE in files else "full",
        base_model=str(info.get("base_model") or subject.base_model or ""),
        demo_model=bool(info.get("demo_model")),
        trigger=trigger,
        downloads=downloads,
        files=files,
        base_model_info=model_facts(subject),
    )


def require_trained_model(subject: Subject) -> TrainedModel:
    model = trained_model(subject)
    if model is None:
        raise NoTrainedModel("This studio has no trained model yet.")
    return model


def iter_model_zip(storage: Storage, subject: Subject, model: TrainedModel) -> Iterator[bytes]:
    """Every weights file under its run-folder name, plus a manifest saying how to use them.

    Built from plain data taken now: the database session is closed by the time the body streams.
    """
    entries = [ZipEntry(storage_key=key, name=name, manifest={"file": name})
               for name, key in sorted(model.files.items())]
    about = {
        "studio": subject.name,
        "method": model.method,
        "base_model": model.base_model,
        "base_model_info": model.base_model_info.as_json() if model.base_model_info is not None else None,
        "trigger": model.trigger,
        "identifier": subject.identifier,
        "class_noun": subject.class_noun,
        "exported_at": utcnow().isoformat(),
    }
    return iter_zip(storage, entries, about, listing="files")
