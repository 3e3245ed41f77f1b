"""Generated pictures of a subject, and the shared class-prior banks."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, TimestampMixin, utcnow


class GeneratedImage(IdMixin, TimestampMixin, Base):
    """One picture in a gallery, with what made it and how well it keeps the subject's likeness."""

    __tablename__ = "generated_images"

    subject_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    storage_key: Mapped[str] = mapped_column(String(500))
    prompt: Mapped[str] = mapped_column(String(500))
    prompt_template: Mapped[str] = mapped_column(String(500))
    seed: Mapped[int]
    steps: Mapped[int]
    guidance: Mapped[float]
    width: Mapped[int]
    height: Mapped[int]
    dino: Mapped[float | None] = mapped_column(default=None)
    clip_i: Mapped[float | None] = mapped_column(default=None)
    clip_t: Mapped[float | None] = mapped_column(default=None)
    # A person's picture: the mean face-descriptor distance to the uploads (smaller is closer; under
    # 0.6 the same person), None when no face was found in it; face_checked says it was looked for.
    face_distance: Mapped[float | None] = mapped_column(default=None)
    face_checked: Mapped[bool] = mapped_column(default=False, server_default=false())
    rank: Mapped[int | None] = mapped_column(default=None)
    favourite: Mapped[bool] = mapped_column(default=False)


class PriorBank(IdMixin, TimestampMixin, Base):
    """A shared bank of class-prior images, reused by every account's jobs of the same class.

    Keyed by (model fingerprint, class prompt, resolution, sampler, steps, guidance); the images
    themselves live in storage under ``storage_prefix``.
    """

    __tablename__ = "prior_banks"
    __table_args__ = (UniqueConstraint("key", name="uq_prior_banks_key"),)

    key: Mapped[str] = mapped_column(String(64))
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    class_prompt: Mapped[str] = mapped_column(String(200))
    resolution: Mapped[int]
    sampler: Mapped[str] = mapped_column(String(40))
    steps: Mapped[int]
    guidance: Mapped[float]
    image_count: Mapped[int] = mapped_column(default=0)
    storage_prefix: Mapped[str] = mapped_column(String(500))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
