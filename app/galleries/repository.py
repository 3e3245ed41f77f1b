"""Queries on generated images. Every query is scoped to the owner through the image's subject, in the query."""

from __future__ import annotations

import uuid
from typing import Literal

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.models import GeneratedImage, Subject

GallerySort = Literal["likeness", "created"]


def images_of_subject(
    session: Session,
    subject_id: uuid.UUID,
    owner_id: uuid.UUID,
    favourites_only: bool = False,
    sort: GallerySort = "created",
) -> list[GeneratedImage]:
    """The subject's images. ``likeness``: a person's pictures by face match (closest first, those
    without a face and those never checked after them), then by rank (unranked last); ``created``:
    oldest first."""
    query = (
        select(GeneratedImage)
        .join(Subject, Subject.id == GeneratedImage.subject_id)
        .where(GeneratedImage.subject_id == subject_id, Subject.owner_id == owner_id)
    )
    if favourites_only:
        query = query.where(GeneratedImage.favourite.is_(True))
    chronological = (GeneratedImage.created_at, GeneratedImage.seed, GeneratedImage.id)
    if sort == "likeness":
        query = query.order_by(GeneratedImage.face_distance.is_(None), GeneratedImage.face_distance,
                               GeneratedImage.rank.is_(None), GeneratedImage.rank, *chronological)
    else:
        query = query.order_by(*chronological)
    return list(session.scalars(query))


def get_image(session: Session, image_id: uuid.UUID, owner_id: uuid.UUID) -> GeneratedImage | None:
    """The image ``image_id`` if ``owner_id`` owns its subject, else None."""
    return session.scalars(
        select(GeneratedImage)
        .join(Subject, Subject.id == GeneratedImage.subject_id)
        .where(GeneratedImage.id == image_id, Subject.owner_id == owner_id)
    ).one_or_none()


def get_image_with_subject(
    session: Session, image_id: uuid.UUID, owner_id: uuid.UUID, subject_id: uuid.UUID | None = None
) -> tuple[GeneratedImage, Subject] | None:
    """The image and its subject in one query; ``subject_id`` also requires the image to belong to it."""
    query = (
        select(GeneratedImage, Subject)
        .join(Subject, Subject.id == GeneratedImage.subject_id)
        .where(GeneratedImage.id == image_id, Subject.owner_id == owner_id)
    )
    if subject_id is not None:
        query = query.where(Subject.id == subject_id)
    row = session.execute(query).one_or_none()
    return None if row is None else (row[0], row[1])


def position_in_prompt(session: Session, image: GeneratedImage) -> int:
    """1-based position of ``image`` among its subject's images of the same prompt, oldest first.

    Names downloads ("rex-on-the-beach-3.png") the same way whatever order the gallery shows.
    """
    earlier = or_(
        GeneratedImage.created_at < image.created_at,
        and_(GeneratedImage.created_at == image.created_at, GeneratedImage.seed < image.seed),
        and_(
            GeneratedImage.created_at == image.created_at,
            GeneratedImage.seed == image.seed,
            GeneratedImage.id < image.id,
        ),
    )
    count = session.scalar(
        select(func.count())
        .select_from(GeneratedImage)
        .where(
            GeneratedImage.subject_id == image.subject_id,
            GeneratedImage.prompt_template == image.prompt_template,
            earlier,
        )
    )
    return (count or 0) + 1


def count_images(session: Session, subject_id: uuid.UUID) -> int:
    return session.scalar(
        select(func.count()).select_from(GeneratedImage).where(GeneratedImage.subject_id == subject_id)
    ) or 0
