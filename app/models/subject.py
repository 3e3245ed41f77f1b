"""A subject (the dog, cat or person of a studio) and the photos uploaded of it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, TimestampMixin

SUBJECT_KINDS = ("dog", "cat", "animal", "person")


class Subject(IdMixin, TimestampMixin, Base):
    """One studio: what the photos show and how to train on it.

    ``kind`` is dog, cat, animal (``class_noun`` typed by the owner) or person (``class_noun`` man,
    woman or person). ``identifier`` is the rare token [V], chosen by the worker at training.
    ``base_model_choice`` is what the owner chose to train on; ``base_model`` and ``model_info``
    (with the model's family) are what the worker loaded and published.
    """

    __tablename__ = "subjects"

    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(16))
    class_noun: Mapped[str] = mapped_column(String(40))
    identifier: Mapped[str | None] = mapped_column(String(16), default=None)
    style_pack: Mapped[str] = mapped_column(String(60))
    prompts: Mapped[list[str]] = mapped_column(JSON, default=list)
    images_per_prompt: Mapped[int] = mapped_column(default=4)
    quality: Mapped[str] = mapped_column(String(16), default="balanced")
    consent_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    photos_deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    weights_key: Mapped[str | None] = mapped_column(String(500), default=None)
    base_model: Mapped[str | None] = mapped_column(String(300), default=None)
    # The base model the owner chose at creation, as offered then (app.subjects.base_models.Offer:
    # key, name, spec, licence, licence_url); None for studios made before there was a choice.
    base_model_choice: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    model_info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Photo(IdMixin, TimestampMixin, Base):
    """A sanitized upload: re-encoded from pixels, no metadata. The key comes from server ids only."""

    __tablename__ = "photos"

    subject_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"), index=True)
    position: Mapped[int]
    storage_key: Mapped[str] = mapped_column(String(500))
    original_name: Mapped[str] = mapped_column(String(255))
    width: Mapped[int]
    height: Mapped[int]
    byte_size: Mapped[int]
    perceptual_hash: Mapped[str] = mapped_column(String(32))
