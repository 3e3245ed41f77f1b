"""What a studio looks like at the edges: the creation input, and the JSON the API answers with."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

# Quality preset → (title, one-line explanation) as the form shows them; the worker maps the name to steps.
QUALITY_PRESETS: dict[str, tuple[str, str]] = {
    "fast": ("Fast", "Fewer training steps. Good for trying things out."),
    "balanced": ("Balanced", "The best likeness for the time it takes. Recommended."),
    "best": ("Best", "More steps and more pictures to choose from. Takes longest."),
}
DEFAULT_QUALITY = "balanced"
DEFAULT_IMAGES_PER_PROMPT = 4
PERSON_NOUNS = ("man", "woman", "person")


@dataclass(frozen=True)
class CreateStudio:
    """A new studio as a person filled it in, before any check. The service validates every field.

    ``images_per_prompt`` is None when what was sent is not a whole number.
    """

    name: str
    kind: str
    class_noun: str = ""
    style_pack: str = ""
    prompts: tuple[str, ...] = ()
    images_per_prompt: int | None = DEFAULT_IMAGES_PER_PROMPT
    quality: str = DEFAULT_QUALITY
    consent: bool = False
    base_model: str = ""  # a key of the offered base models; empty: the default one

    @classmethod
    def from_form(cls, values: dict[str, list[str]]) -> CreateStudio:
        """Build from a form's text fields (each name → every value it was sent with)."""

        def first(name: str, default: str = "") -> str:
            found = values.get(name) or [default]
            return found[0]

        return cls(
            name=first("name"),
            kind=first("kind").strip().lower(),
            class_noun=first("class_noun"),
            style_pack=first("style_pack").strip(),
            prompts=tuple(split_prompts(values.get("prompts", []))),
            images_per_prompt=parse_whole_number(first("images_per_prompt", str(DEFAULT_IMAGES_PER_PROMPT))),
            quality=first("quality", DEFAULT_QUALITY).strip().lower() or DEFAULT_QUALITY,
            consent=first("consent").strip().lower() in ("1", "true", "on", "yes"),
            base_model=first("base_model").strip(),
        )


def split_prompts(values: Iterable[str]) -> list[str]:
    """Prompts from a repeated field and/or newline-separated text; blank lines dropped."""
    return [line.strip() for value in values for line in value.splitlines() if line.strip()]


def parse_whole_number(value: str) -> int | None:
    try:
        return int(value.strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class FileProblem:
    name: str
    reason: str


@dataclass
class StudioProblems:
    """Everything wrong with one creation request: field name → sentence, and the refused files."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[FileProblem] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.fields or self.files)

    def sentences(self) -> list[str]:
        """Every problem as a sentence a person reads, fields first."""
        return [*self.fields.values(), *(f"{problem.name}: {problem.reason}" for problem in self.files)]

    def summary(self) -> str:
        count = len(self.fields) + len(self.files)
        if self.files and not self.fields:
            noun = "photo" if len(self.files) == 1 else "photos"
            return f"{len(self.files)} {noun} could not be used. Replace or remove them and try again."
        return "Please fix the problem below." if count == 1 else f"Please fix the {count} problems below."

    def as_json(self) -> dict[str, Any]:
        return {
            "detail": self.summary(),
            "fields": dict(self.fields),
            "files": [{"name": problem.name, "reason": problem.reason} for problem in self.files],
        }


# --- API answers ----------------------------------------------------------------------------------


class StylePackOut(BaseModel):
    name: str
    title: str
    kind: Literal["pet", "person"]
    prompts: list[str] = Field(description='templates; a trailing "(portrait)" or "(landscape)" is the shape')
    shape: Literal["square", "portrait", "landscape"] = Field(description="the shape of the pack's pictures")
    sample_url: str | None = Field(
        description="a small illustration of the pack's style, drawn for this page: not a picture the studio made")


class BaseModelOut(BaseModel):
    key: str = Field(description="the value of the ``base_model`` field when creating a studio")
    name: str = Field(description="the name people see")
    licence: str | None = Field(description='the model\'s licence, e.g. "CreativeML Open RAIL++-M"')
    licence_url: str | None
    default: bool = Field(description="the model a studio gets when ``base_model`` is left out")


class BaseModelInfo(BaseModel):
    """A studio's base model: the owner's choice, and its family once a worker has loaded it."""

    key: str | None = Field(description="the key chosen at creation (null for studios made before the choice)")
    name: str
    family: str | None = Field(description='detected when loaded, e.g. "Stable Diffusion XL"; null before')
    family_id: str | None = Field(description='the family\'s short id, e.g. "sd" or "sdxl"')
    licence: str | None
    licence_url: str | None
    spec: str | None = Field(description="what the worker loaded: a hub id, a path or a built-in name")


class PhotoOut(BaseModel):
    id: uuid.UUID
    position: int
    original_name: str
    width: int
    height: int
    url: str


class JobSummary(BaseModel):
    id: uuid.UUID
    kind: str
    status: str
    stage: str
    step: int
    total: int
    failure_reason: str | None
    created_at: datetime
    finished_at: datetime | None
    url: str


class SubjectSummary(BaseModel):
    id: uuid.UUID
    name: str
    kind: str
    class_noun: str
    status: str
    thumbnail_url: str | None
    created_at: datetime
    expires_at: datetime
    url: str
    page_url: str


class SubjectCounts(BaseModel):
    photos: int
    images: int
    jobs: int


class SubjectDetail(SubjectSummary):
    style_pack: str
    prompts: list[str]
    images_per_prompt: int
    quality: str
    identifier: str | None
    base_model: str | None
    base_model_info: BaseModelInfo | None
    consent_at: datetime
    photos_deleted_at: datetime | None
    photos: list[PhotoOut]
    latest_job: JobSummary | None
    counts: SubjectCounts


class SubjectUpdate(BaseModel):
    # No length limits here: an empty or too long name gets the service's sentence, not pydantic's list.
    name: str = Field(description="the studio's new name, 1 to 100 characters (spaces at the ends dropped)")


class SubjectList(BaseModel):
    subjects: list[SubjectSummary]


class StudioCreated(BaseModel):
    subject: SubjectDetail
    job: JobSummary
