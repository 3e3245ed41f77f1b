"""Rows for web tests, made directly with the ORM: users, subjects, photos, jobs and generated images.

Every factory flushes (so ids exist) and never commits: a test that goes through the app commits
itself. ``make_image`` and ``make_photo`` also write a real small image into storage under the
key the app would use.
"""

from __future__ import annotations

import io
import uuid
from datetime import timedelta
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session

from app.models import GeneratedImage, Job, Photo, Subject, User, utcnow
from app.storage import Storage
from app.storage.base import image_key, photo_key


def png_bytes(seed: int = 0, size: int = 16) -> bytes:
    """A small PNG whose colour depends on ``seed``."""
    colour = ((seed * 67) % 256, (seed * 131) % 256, (seed * 197) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int = 0, size: int = 32) -> bytes:
    colour = ((seed * 29) % 256, (seed * 83) % 256, (seed * 151) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_user(session: Session, email: str | None = None) -> User:
    """An account that can only be used through the ORM (its password hash is not a real hash)."""
    user = User(email=email or f"user-{uuid.uuid4().hex[:8]}@example.com", password_hash="not-a-real-hash")
    session.add(user)
    session.flush()
    return user


def make_subject(session: Session, owner: User, **overrides: Any) -> Subject:
    now = utcnow()
    values: dict[str, Any] = {
        "owner_id": owner.id,
        "name": "Rex",
        "kind": "dog",
        "class_noun": "dog",
        "style_pack": "pet-adventures",
        "prompts": [],
        "images_per_prompt": 4,
        "consent_at": now,
        "expires_at": now + timedelta(days=30),
    }
    values.update(overrides)
    subject = Subject(**values)
    session.add(subject)
    session.flush()
    return subject


def make_photo(session: Session, storage: Storage, subject: Subject, position: int = 0) -> Photo:
    photo_id = uuid.uuid4()
    key = photo_key(subject.owner_id, subject.id, photo_id)
    data = jpeg_bytes(position)
    storage.put_bytes(key, data, "image/jpeg")
    photo = Photo(
        id=photo_id, subject_id=subject.id, position=position, storage_key=key,
        original_name=f"photo-{position}.jpg", width=32, height=32, byte_size=len(data),
        perceptual_hash=f"{position:016x}",
    )
    session.add(photo)
    session.flush()
    return photo


def make_job(session: Session, subject: Subject, **overrides: Any) -> Job:
    """A job of ``subject``; status, stage, step, details... can be overridden.

    A queued job was sent when it was created (``enqueued_at``), as the web's enqueue does.
    """
    values: dict[str, Any] = {
        "subject_id": subject.id,
        "owner_id": subject.owner_id,
        "kind": "train",
        "status": "queued",
        "stage": "queued",
        "details": {},
        "preview_keys": [],
    }
    values.update(overrides)
    if values["status"] == "queued" and "enqueued_at" not in overrides:
        values["enqueued_at"] = values.get("created_at") or utcnow()
    job = Job(**values)
    session.add(job)
    session.flush()
    return job


def make_image(
    session: Session,
    storage: Storage,
    subject: Subject,
    job: Job,
    prompt_template: str = "a photo of {subject} on the beach",
    seed: int = 0,
    data: bytes | None = None,
    **overrides: Any,
) -> GeneratedImage:
    """A generated image row and its PNG in storage (``data`` replaces the PNG bytes when given)."""
    image_id = uuid.uuid4()
    key = image_key(subject.owner_id, subject.id, image_id)
    storage.put_bytes(key, data if data is not None else png_bytes(seed), "image/png")
    identifier = subject.identifier or "qzx"
    values: dict[str, Any] = {
        "id": image_id,
        "subject_id": subject.id,
        "job_id": job.id,
        "storage_key": key,
        "prompt": prompt_template.replace("{subject}", f"{identifier} {subject.class_noun}"),
        "prompt_template": prompt_template,
        "seed": seed,
        "steps": 4,
        "guidance": 7.5,
        "width": 16,
        "height": 16,
    }
    values.update(overrides)
    image = GeneratedImage(**values)
    session.add(image)
    session.flush()
    return image
