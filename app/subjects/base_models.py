"""The base models a studio can be trained on: what the operator offers, the one a person chose, and
what pages, the API and the ZIP manifests say about it (its name, family and licence).

The operator lists the models in ``STUDIO_BASE_MODELS`` (see :class:`app.config.BaseModelOption`).
Without a list there is one model, :data:`DEFAULT_KEY`: the worker's own ``STUDIO_BASE_MODEL`` (or
its default demo model), exactly as before there was a choice.

A studio records its choice at creation as a snapshot (``Subject.base_model_choice``: key, name,
spec, licence): the worker trains what the person chose even if the operator edits the list later,
and the pages keep naming the model the studio was made with. The family ("Stable Diffusion XL")
is never configured: the worker detects it from what it loads and records it in the job's details
and the subject's ``model_info``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from app.config import Settings
from app.models import Subject

# The key of the single model when the operator lists none.
DEFAULT_KEY = "default"
DEFAULT_NAME = "The studio's standard model"


@dataclass(frozen=True)
class Offer:
    """One model a person may choose. ``spec`` None: whatever the worker is configured with."""

    key: str
    name: str
    spec: str | None
    licence: str | None = None
    licence_url: str | None = None

    def record(self) -> dict[str, Any]:
        """The snapshot a studio keeps of its choice."""
        return asdict(self)


def offered(settings: Settings) -> list[Offer]:
    """The models the new-studio form and the API offer, the default first."""
    if settings.base_models:
        return [Offer(option.key, option.name, option.spec, option.licence, option.licence_url)
                for option in settings.base_models]
    return [Offer(DEFAULT_KEY, settings.base_model or DEFAULT_NAME, None)]


def has_choice(settings: Settings) -> bool:
    """Whether the form shows a choice of model (only when there is more than one)."""
    return len(offered(settings)) > 1


def choose(settings: Settings, key: str) -> Offer | None:
    """The offered model with ``key`` (the default for an empty key); None when no model has that key."""
    offers = offered(settings)
    if not key:
        return offers[0]
    return next((offer for offer in offers if offer.key == key), None)


def unknown_key_message(settings: Settings, key: str) -> str:
    keys = ", ".join(offer.key for offer in offered(settings))
    shown = key if len(key) <= 40 else key[:40] + "…"
    return f"“{shown}” is not one of this studio's base models; choose one of: {keys}."


@dataclass(frozen=True)
class ModelFacts:
    """What a studio's base model is, as far as is known: the choice (name, licence) from creation,
    the family and the loaded spec once a worker has loaded it."""

    key: str | None
    name: str
    family: str | None  # what people read: "Stable Diffusion XL"
    family_id: str | None  # the engine's short id: "sdxl"
    licence: str | None
    licence_url: str | None
    spec: str | None  # what the worker loaded (None before it did)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def model_facts(subject: Subject, job_details: Mapping[str, Any] | None = None) -> ModelFacts | None:
    """The studio's base model from its recorded choice, its published ``model_info`` and, before
    training has published, the details of its training job (``job_details``); None when nothing is
    known yet (a studio from before the choice existed, not trained yet)."""
    choice: Mapping[str, Any] = subject.base_model_choice or {}
    info: Mapping[str, Any] = subject.model_info or {}
    details: Mapping[str, Any] = job_details or {}
    spec = _text(info.get("base_model")) or _text(subject.base_model) or _text(details.get("base_model"))
    family = _text(info.get("family_label")) or _text(details.get("family_label"))
    family_id = _text(info.get("family")) or _text(details.get("family"))
    name = _text(choice.get("name"))
    if name is None or (choice.get("key") == DEFAULT_KEY and name == DEFAULT_NAME and spec):
        name = spec  # the single, unnamed model: its spec says more than "standard"
    if name is None:
        return None
    return ModelFacts(
        key=_text(choice.get("key")),
        name=name,
        family=family,
        family_id=family_id,
        licence=_text(choice.get("licence")),
        licence_url=_text(choice.get("licence_url")),
        spec=spec,
    )
