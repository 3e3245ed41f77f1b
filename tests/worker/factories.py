"""Rows and files for pipeline tests: an account, a subject with stored photos, a job."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from app.models import Job, Photo, Subject, User, utcnow
from app.storage import Storage
from app.storage.base import photo_key


def photo_bytes(seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
    """A synthetic subject photo: a textured blob on a noisy background, sharp enough for the photo checks."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    background = rng.integers(0, 60, size=(height, width, 3)).astype(np.float32) + 40
    cx, cy, radius = width * (0.4 + 0.2 * rng.random()), height * (0.4 + 0.2 * rng.random()), min(size) * 0.3
    blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < radius**2
    colour = np.array([200, 140, 60], dtype=np.float32) + rng.integers(-20, 20, size=3)
    checker = ((xx // 6 + yy // 6) % 2)[..., None] * 30.0
    pixels = np.where(blob[..., None], colour + checker, background)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_user(session: Session, email: str | None = None) -> User:
    user = User(email=email or f"{uuid.uuid4().hex[:10]}@example.com", password_hash="not-a-real-hash")
    session.add(user)
    session.flush()
    return user


def make_subject(session: Session, storage: Storage, owner: User, *, photos: int = 4, kind: str = "dog",
                 class_noun: str = "dog", prompts: list[str] | None = None, images_per_prompt: int = 1,
                 retention_days: int = 30, **fields: Any) -> Subject:
    """A subject with ``photos`` sanitized-looking JPEGs in storage and their rows (flushed)."""
    now = utcnow()
    subject = Subject(
        owner_id=owner.id,
        name=fields.pop("name", "Rex"),
        kind=kind,
        class_noun=class_noun,
        style_pack=fields.pop("style_pack", ""),
        prompts=prompts if prompts is not None else ["a photo of {subject} on the beach",
                                                     "a photo of {subject} in the snow"],
        images_per_prompt=images_per_prompt,
        quality=fields.pop("quality", "fast"),
        consent_at=now,
        expires_at=fields.pop("expires_at", now + timedelta(days=retention_days)),
        **fields,
    )
    session.add(subject)
    session.flush()
    for position in range(photos):
        photo_id = uuid.uuid4()
        key = photo_key(owner.id, subject.id, photo_id)
        data = photo_bytes(seed=position + 17 * (subject.id.int % 1000))
        storage.put_bytes(key, data, "image/jpeg")
        session.add(Photo(id=photo_id, subject_id=subject.id, position=position, storage_key=key,
                          original_name=f"photo{position}.jpg", width=160, height=120, byte_size=len(data),
                          perceptual_hash="0" * 16))
    session.flush()
    return subject


def make_job(session: Session, subject: Subject, *, kind: str = "train", **fields: Any) -> Job:
    job = Job(subject_id=subject.id, owner_id=subject.owner_id, kind=kind, status=fields.pop("status", "queued"),
              max_attempts=fields.pop("max_attempts", 3), **fields)
    session.add(job)
    session.flush()
    return job
