"""Queries on jobs. Every query that loads a job for a person is scoped to its owner in the query itself."""

from __future__ import annotations

import uuid

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from app.models import ACTIVE_STATUSES, Job, Subject


def get_job(session: Session, job_id: uuid.UUID, owner_id: uuid.UUID) -> Job | None:
    """The job ``job_id`` if ``owner_id`` owns it, else None (another account's job looks absent)."""
    return session.scalars(select(Job).where(Job.id == job_id, Job.owner_id == owner_id)).one_or_none()


def get_job_and_class_noun(session: Session, job_id: uuid.UUID, owner_id: uuid.UUID) -> tuple[Job, str] | None:
    """The job and its subject's class noun ("dog", "woman") in one query, for the status endpoint."""
    row = session.execute(
        select(Job, Subject.class_noun)
        .join(Subject, Subject.id == Job.subject_id)
        .where(Job.id == job_id, Job.owner_id == owner_id, Subject.owner_id == owner_id)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def jobs_of_subject(session: Session, subject_id: uuid.UUID, owner_id: uuid.UUID) -> list[Job]:
    """The subject's jobs, newest first."""
    return list(
        session.scalars(
            select(Job)
            .where(Job.subject_id == subject_id, Job.owner_id == owner_id)
            .order_by(Job.created_at.desc(), Job.id.desc())
        )
    )


def latest_job(session: Session, subject_id: uuid.UUID, owner_id: uuid.UUID) -> Job | None:
    return session.scalars(
        select(Job)
        .where(Job.subject_id == subject_id, Job.owner_id == owner_id)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(1)
    ).first()


def active_job_of_subject(session: Session, subject_id: uuid.UUID) -> Job | None:
    """A queued or running job of the subject, if any."""
    return session.scalars(
        select(Job).where(Job.subject_id == subject_id, Job.status.in_(ACTIVE_STATUSES)).limit(1)
    ).first()


def active_jobs_of_owner(session: Session, owner_id: uuid.UUID) -> list[Job]:
    """The owner's queued and running jobs, oldest first."""
    return list(session.scalars(
        select(Job).where(Job.owner_id == owner_id, Job.status.in_(ACTIVE_STATUSES)).order_by(Job.created_at)
    ))


def count_active_jobs_of_owner(session: Session, owner_id: uuid.UUID) -> int:
    return session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status.in_(ACTIVE_STATUSES))
    ) or 0


def _queued_before(job: Job) -> ColumnElement[bool]:
    sent = and_(Job.status == "queued", Job.enqueued_at.is_not(None), Job.id != job.id)
    if job.enqueued_at is not None:
        sent = and_(sent, or_(
            Job.enqueued_at < job.enqueued_at,
            and_(Job.enqueued_at == job.enqueued_at, Job.id < job.id),
        ))
    return sent


def count_queued_before(session: Session, job: Job) -> int:
    """How many queued jobs, of every account, a worker will take before ``job``.

    Workers take jobs in the order their messages were sent, which ``enqueued_at`` records (it is
    stamped once the broker took the message; ties broken by id). A job without a stamp has no
    message waiting (its send failed, or the broker lost it and the reaper has not sent it again),
    so it is ahead of nobody; such a job itself waits behind every job that has one.
    Served by the (status, enqueued_at) index, so the status endpoint can afford it on every poll.
    """
    return session.scalar(select(func.count()).select_from(Job).where(_queued_before(job))) or 0


# The jobs ahead in line counted into a waiting job's estimate; further ones change it little.
AHEAD_LIMIT = 100


def jobs_ahead(session: Session, job: Job) -> tuple[list[Job], list[Job]]:
    """The running jobs (of every account) and the queued jobs a worker takes before ``job``, for its wait.

    Only the columns an estimate reads matter; the caller never shows another account's job.
    """
    running = list(session.scalars(select(Job).where(Job.status == "running").limit(AHEAD_LIMIT)))
    queued = list(session.scalars(select(Job).where(_queued_before(job)).order_by(Job.enqueued_at)
                                  .limit(AHEAD_LIMIT)))
    return running, queued
