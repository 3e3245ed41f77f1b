"""Queries on subjects and their photos. Every object query is scoped to its owner in the query itself,
so another account's id finds nothing (and the routes answer 404)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import ACTIVE_STATUSES, GeneratedImage, Job, Photo, Subject


def list_for_owner(session: Session, owner_id: uuid.UUID) -> list[Subject]:
    """The owner's studios, newest first."""
    query = select(Subject).where(Subject.owner_id == owner_id).order_by(Subject.created_at.desc(), Subject.id)
    return list(session.scalars(query))


def get_for_owner(session: Session, owner_id: uuid.UUID, subject_id: uuid.UUID) -> Subject | None:
    query = select(Subject).where(Subject.id == subject_id, Subject.owner_id == owner_id)
    return session.scalars(query).one_or_none()


def photos_of(session: Session, subject: Subject) -> list[Photo]:
    """The subject's photos in upload order (the caller got ``subject`` through an owner-scoped query)."""
    query = select(Photo).where(Photo.subject_id == subject.id).order_by(Photo.position)
    return list(session.scalars(query))


def get_photo_for_owner(
    session: Session, owner_id: uuid.UUID, subject_id: uuid.UUID, photo_id: uuid.UUID
) -> Photo | None:
    query = (
        select(Photo)
        .join(Subject, Subject.id == Photo.subject_id)
        .where(Photo.id == photo_id, Photo.subject_id == subject_id, Subject.owner_id == owner_id)
    )
    return session.scalars(query).one_or_none()


def latest_jobs(session: Session, subject_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Job]:
    """The newest job of each subject, keyed by subject id (subjects without a job are absent)."""
    if not subject_ids:
        return {}
    newest: dict[uuid.UUID, Job] = {}
    query = select(Job).where(Job.subject_id.in_(subject_ids)).order_by(Job.created_at.desc(), Job.id)
    for job in session.scalars(query):
        newest.setdefault(job.subject_id, job)
    return newest


def first_photos(session: Session, subject_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Photo]:
    """Each subject's first photo (its thumbnail), keyed by subject id."""
    if not subject_ids:
        return {}
    lowest = (
        select(Photo.subject_id, func.min(Photo.position).label("position"))
        .where(Photo.subject_id.in_(subject_ids))
        .group_by(Photo.subject_id)
        .subquery()
    )
    query = select(Photo).join(
        lowest, (Photo.subject_id == lowest.c.subject_id) & (Photo.position == lowest.c.position)
    )
    return {photo.subject_id: photo for photo in session.scalars(query)}


def best_images(session: Session, subject_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, GeneratedImage]:
    """Each subject's best picture (best likeness rank; unranked: the first made), keyed by subject id:
    the cover of a studio whose photos are gone."""
    if not subject_ids:
        return {}
    place = func.row_number().over(
        partition_by=GeneratedImage.subject_id,
        order_by=(GeneratedImage.rank.is_(None), GeneratedImage.rank, GeneratedImage.created_at,
                  GeneratedImage.seed, GeneratedImage.id),
    ).label("place")
    ranked = select(GeneratedImage.id, place).where(GeneratedImage.subject_id.in_(subject_ids)).subquery()
    query = select(GeneratedImage).join(ranked, ranked.c.id == GeneratedImage.id).where(ranked.c.place == 1)
    return {image.subject_id: image for image in session.scalars(query)}


def count_photos(session: Session, subject_id: uuid.UUID) -> int:
    return session.scalar(select(func.count()).select_from(Photo).where(Photo.subject_id == subject_id)) or 0


def count_images(session: Session, subject_id: uuid.UUID) -> int:
    query = select(func.count()).select_from(GeneratedImage).where(GeneratedImage.subject_id == subject_id)
    return session.scalar(query) or 0


def count_jobs(session: Session, subject_id: uuid.UUID) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.subject_id == subject_id)) or 0


def count_active_jobs(session: Session, owner_id: uuid.UUID) -> int:
    """How many of the owner's jobs are queued or running."""
    query = select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status.in_(ACTIVE_STATUSES))
    return session.scalar(query) or 0
