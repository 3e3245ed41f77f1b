"""Retention: uploads are removed after training, everything else after ``retention_days`` unless renewed.

A subject's ``expires_at`` is set at creation (:func:`expiry_for`) and shown in the UI and the API;
:func:`renew` pushes it back. :func:`enforce_retention` (run hourly by the ``maintenance.retention``
task) deletes expired subjects completely and removes photos left behind after a finished training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Job, Photo, Subject, utcnow
from app.storage import Storage
from app.storage.base import subject_prefix
from app.subjects.deletion import delete_subject

log = logging.getLogger(__name__)

BATCH_SIZE = 100


def expiry_for(created_at: datetime, settings: Settings) -> datetime:
    """When a subject created at ``created_at`` expires: ``settings.retention_days`` later."""
    if created_at.tzinfo is None:
        raise ValueError("created_at must be a timezone-aware UTC datetime")
    if settings.retention_days <= 0:
        raise ValueError(f"retention_days must be positive, got {settings.retention_days}")
    return created_at + timedelta(days=settings.retention_days)


# A renewal is offered only when it keeps the studio at least this much longer: on a new studio
# "keep it 30 more days" would otherwise answer with (almost) the date it already had.
MIN_RENEWAL = timedelta(days=1)


def renewal_offer(subject: Subject, settings: Settings, now: datetime | None = None) -> datetime | None:
    """The expiry a renewal now would give, when that adds at least :data:`MIN_RENEWAL`; else None."""
    offered = expiry_for(now or utcnow(), settings)
    return offered if offered - subject.expires_at >= MIN_RENEWAL else None


def renewable_from(subject: Subject, settings: Settings) -> datetime:
    """From when a renewal adds :data:`MIN_RENEWAL` (before that :func:`renewal_offer` is None)."""
    return subject.expires_at - timedelta(days=settings.retention_days) + MIN_RENEWAL


def renew(session: Session, subject: Subject, settings: Settings, now: datetime | None = None) -> datetime:
    """Keep ``subject`` for another ``retention_days`` from now; returns the new expiry (flushed)."""
    subject.expires_at = expiry_for(now or utcnow(), settings)
    session.flush()
    return subject.expires_at


@dataclass
class RetentionReport:
    expired_subjects: list[str] = field(default_factory=list)
    photo_sets_removed: list[str] = field(default_factory=list)


def enforce_retention(session: Session, storage: Storage, settings: Settings,
                      now: datetime | None = None) -> RetentionReport:
    """Delete expired subjects and, when configured, photos of subjects whose training is done.

    Works in batches of ``BATCH_SIZE`` (the hourly task picks up the rest); flushes, never commits.
    """
    now = now or utcnow()
    report = RetentionReport()
    expired = session.execute(
        select(Subject).where(Subject.expires_at <= now).order_by(Subject.expires_at).limit(BATCH_SIZE)
    ).scalars().all()
    for subject in expired:
        report.expired_subjects.append(str(subject.id))
        delete_subject(session, storage, subject)
    if settings.delete_photos_after_training:
        trained = session.execute(
            select(Subject)
            .where(
                exists().where(Job.subject_id == Subject.id, Job.kind == "train", Job.status == "done"),
                exists().where(Photo.subject_id == Subject.id),
            )
            .limit(BATCH_SIZE)
        ).scalars().all()
        for subject in trained:
            remove_photos(session, storage, subject, now)
            report.photo_sets_removed.append(str(subject.id))
    if report.expired_subjects or report.photo_sets_removed:
        log.info("retention: %d subjects expired, %d photo sets removed",
                 len(report.expired_subjects), len(report.photo_sets_removed))
    return report


def remove_photos(session: Session, storage: Storage, subject: Subject, now: datetime | None = None) -> int:
    """Delete a subject's uploaded photos (files and rows) and record when; returns how many files went."""
    keys = session.execute(select(Photo.storage_key).where(Photo.subject_id == subject.id)).scalars().all()
    for key in keys:
        storage.delete(key)
    removed = len(keys) + storage.delete_prefix(f"{subject_prefix(subject.owner_id, subject.id)}photos/")
    session.execute(delete(Photo).where(Photo.subject_id == subject.id).execution_options(synchronize_session=False))
    subject.photos_deleted_at = subject.photos_deleted_at or now or utcnow()
    session.flush()
    return removed
