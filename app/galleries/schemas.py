"""What the gallery API takes and returns."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.galleries.service import face_match
from app.jobs.schemas import JobStatus
from app.models import GeneratedImage
from app.subjects.schemas import BaseModelInfo


class Scores(BaseModel):
    """Likeness scores from the worker (null when it did not score): DINO and CLIP image similarity to the
    photos, CLIP text similarity to the prompt."""

    dino: float | None
    clip_i: float | None
    clip_t: float | None
    face_distance: float | None = Field(
        default=None, description="a person's picture: the mean face-descriptor distance to the uploads' faces "
        "(smaller is closer; under 0.6 the same person, under 0.5 a strong match); null when no face was found "
        "or the picture is not of a person")


class ImageOut(BaseModel):
    id: uuid.UUID
    subject_id: uuid.UUID
    job_id: uuid.UUID
    prompt: str = Field(description='the prompt the model saw, e.g. "a photo of qzx dog on the beach"')
    prompt_template: str = Field(description='the prompt as written, with {subject}')
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scores: Scores
    rank: int | None = Field(description="1 is the best likeness among the studio's images; null when unscored")
    face_match: Literal["strong match", "weak match", "not a match", "no face found"] | None = Field(
        description="a person's picture: its face match in words; null when faces were not checked (pets)")
    favourite: bool
    created_at: datetime
    file_url: str

    @classmethod
    def of(cls, image: GeneratedImage) -> ImageOut:
        return cls(
            id=image.id,
            subject_id=image.subject_id,
            job_id=image.job_id,
            prompt=image.prompt,
            prompt_template=image.prompt_template,
            seed=image.seed,
            steps=image.steps,
            guidance=image.guidance,
            width=image.width,
            height=image.height,
            scores=Scores(dino=image.dino, clip_i=image.clip_i, clip_t=image.clip_t,
                          face_distance=image.face_distance),
            rank=image.rank,
            face_match=face_match(image),
            favourite=image.favourite,
            created_at=image.created_at,
            file_url=f"/api/v1/images/{image.id}/file",
        )


class ImageGroup(BaseModel):
    prompt_template: str
    readable_prompt: str = Field(description="the template with {subject} replaced by the studio's name")
    images: list[ImageOut]


class ModelDownloadOut(BaseModel):
    variant: str = Field(description="a1111 (kohya-format LoRA), diffusers (LoRA for load_lora_weights) or zip")
    label: str
    filename: str
    url: str


class TrainedModelOut(BaseModel):
    method: str = Field(description="lora or full")
    base_model: str = Field(description="what to load the weights on: a hub id, a path, or tiny (the demo model)")
    demo_model: bool = Field(description="trained on the built-in demo model, which exists only in this studio")
    trigger: str = Field(description='the words that call up the subject in a prompt, e.g. "qzx dog"')
    base_model_info: BaseModelInfo | None = Field(description="the base model's name, family and licence")
    downloads: list[ModelDownloadOut] = Field(
        description="what this studio's files allow: a1111 only for families with a kohya-ss format"
    )


class ImageList(BaseModel):
    subject_id: uuid.UUID
    count: int
    images: list[ImageOut] = Field(description="every image, in the requested order")
    groups: list[ImageGroup] | None = Field(default=None, description="the same images by prompt, with ?grouped=true")


class FavouriteUpdate(BaseModel):
    # Strict: the schema says boolean, so 0, 1 or "yes" are a 422, not quietly taken for one.
    model_config = ConfigDict(strict=True)

    favourite: bool


class GenerateRequest(BaseModel):
    # No min_length: an empty list gets the service's sentence ("Write at least one prompt, …"), as a
    # list of blank prompts does, not pydantic's error list.
    prompts: list[str] = Field(
        max_length=100,
        description='new prompts; use {subject} where the subject goes ("a photo of {subject} in the snow"). '
        "A prompt without it gets \"a photo of {subject}, \" in front.",
    )
    images_per_prompt: int = Field(default=4, ge=1, le=100)
    shape: Literal["square", "portrait", "landscape"] | None = Field(
        default=None,
        description='the pictures\' shape: portrait 3:4, landscape 4:3, square; a prompt ending in "(portrait)", '
        '"(landscape)" or "(square)" keeps its own. Default: square',
    )


class GenerateAccepted(BaseModel):
    job: JobStatus


class ShareCreate(BaseModel):
    image_id: uuid.UUID | None = Field(default=None, description="one picture of the studio; none: the whole gallery")
    days: Literal[1, 7, 30] = Field(default=7, description="how long the link works")


class ShareOut(BaseModel):
    id: uuid.UUID
    url: str = Field(description="the link's path on this site; anyone with it sees the pictures until it ends")
    image_id: uuid.UUID | None
    created_at: datetime
    expires_at: datetime
    revoked: bool
