"""Queries of the operator console. Every query is scoped to an operator in the query itself.

Like an owner's queries carry ``owner_id == :me``, each of these carries :func:`operator_clause`:
an EXISTS on the asking account being an active operator. A non-operator's id (or a disabled
operator's) makes every query find nothing, so the routes answer 404 whatever a check above them did.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import Session

from app.models import GeneratedImage, Job, PriorBank, Subject, User, WorkerHeartbeat


def operator_clause(operator_id: uuid.UUID) -> ColumnElement[bool]:
    """True when ``operator_id`` is an active operator: added to every console query."""
    return exists(
        select(User.id).where(User.id == operator_id, User.is_operator.is_(True), User.is_active.is_(True))
    )


def get_operator(session: Session, user_id: uuid.UUID) -> User | None:
    """The account ``user_id`` if it is an active operator, else None."""
    return session.scalars(select(User).where(User.id == user_id, operator_clause(user_id))).one_or_none()


# --- jobs -----------------------------------------------------------------------------------------


def get_job(session: Session, operator_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
    return session.scalars(select(Job).where(Job.id == job_id, operator_clause(operator_id))).one_or_none()


def get_subject(session: Session, operator_id: uuid.UUID, subject_id: uuid.UUID) -> Subject | None:
    return session.scalars(
        select(Subject).where(Subject.id == subject_id, operator_clause(operator_id))
    ).one_or_none()


def jobs_with_status(session: Session, operator_id: uuid.UUID, status: str) -> list[tuple[Job, Subject, str]]:
    """Jobs in ``status`` with their subject and owner's email, oldest message first (the queue's order)."""
    rows = session.execute(
        select(Job, Subject, User.email)
        .join(Subject, Subject.id == Job.subject_id)
        .join(User, User.id == Job.owner_id)
        .where(Job.status == status, operator_clause(operator_id))
        # Jobs with a message waiting first, in the order sent; those without one wait behind them.
        .order_by(Job.enqueued_at.is_(None), Job.enqueued_at, Job.id)
    ).all()
    return [(row[0], row[1], row[2]) for row in rows]


def failures_since(session: Session, operator_id: uuid.UUID, since: datetime) -> list[tuple[Job, Subject, str]]:
    rows = session.execute(
        select(Job, Subject, User.email)
        .join(Subject, Subject.id == Job.subject_id)
        .join(User, User.id == Job.owner_id)
        .where(Job.status == "failed", Job.finished_at >= since, operator_clause(operator_id))
        .order_by(Job.finished_at.desc())
    ).all()
    return [(row[0], row[1], row[2]) for row in rows]


def recent_durations(session: Session, operator_id: uuid.UUID, limit: int = 20) -> list[float]:
    """Seconds the last ``limit`` finished training jobs took from start to finish."""
    rows = session.execute(
        select(Job.started_at, Job.finished_at)
        .where(Job.status == "done", Job.kind == "train", Job.started_at.is_not(None), operator_clause(operator_id))
        .order_by(Job.finished_at.desc())
        .limit(limit)
    ).all()
    return [(finished - started).total_seconds() for started, finished in rows if started and finished]


# --- workers --------------------------------------------------------------------------------------


def workers(session: Session, operator_id: uuid.UUID) -> list[WorkerHeartbeat]:
    return list(session.scalars(
        select(WorkerHeartbeat).where(operator_clause(operator_id)).order_by(WorkerHeartbeat.host,
                                                                             WorkerHeartbeat.name)
    ))


def jobs_by_id(session: Session, operator_id: uuid.UUID, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Job]:
    if not job_ids:
        return {}
    found = session.scalars(select(Job).where(Job.id.in_(job_ids), operator_clause(operator_id)))
    return {job.id: job for job in found}


# --- accounts -------------------------------------------------------------------------------------


def accounts(session: Session, operator_id: uuid.UUID) -> list[User]:
    return list(session.scalars(select(User).where(operator_clause(operator_id)).order_by(User.created_at)))


def get_account(session: Session, operator_id: uuid.UUID, user_id: uuid.UUID) -> User | None:
    return session.scalars(select(User).where(User.id == user_id, operator_clause(operator_id))).one_or_none()


def studio_counts(session: Session, operator_id: uuid.UUID) -> dict[uuid.UUID, int]:
    rows = session.execute(
        select(Subject.owner_id, func.count()).where(operator_clause(operator_id)).group_by(Subject.owner_id)
    ).all()
    return {row[0]: int(row[1]) for row in rows}


def picture_counts(session: Session, operator_id: uuid.UUID) -> dict[uuid.UUID, int]:
    rows = session.execute(
        select(Subject.owner_id, func.count(GeneratedImage.id))
        .join(GeneratedImage, GeneratedImage.subject_id == Subject.id)
        .where(operator_clause(operator_id))
        .group_by(Subject.owner_id)
    ).all()
    return {row[0]: int(row[1]) for row in rows}


def job_times(session: Session, operator_id: uuid.UUID) -> list[tuple[uuid.UUID, datetime, datetime | None,
                                                                       datetime | None]]:
    """(owner, started, finished, last heartbeat) of every job that ever started: GPU time comes from these."""
    rows = session.execute(
        select(Job.owner_id, Job.started_at, Job.finished_at, Job.heartbeat_at)
        .where(Job.started_at.is_not(None), operator_clause(operator_id))
    ).all()
    return [(row[0], row[1], row[2], row[3]) for row in rows if row[1] is not None]


# --- prior bank -----------------------------------------------------------------------------------


def prior_banks(session: Session, operator_id: uuid.UUID) -> list[PriorBank]:
    return list(session.scalars(
        select(PriorBank).where(operator_clause(operator_id)).order_by(PriorBank.model_fingerprint,
                                                                       PriorBank.class_prompt)
    ))


def get_prior_bank(session: Session, operator_id: uuid.UUID, bank_id: uuid.UUID) -> PriorBank | None:
    return session.scalars(
        select(PriorBank).where(PriorBank.id == bank_id, operator_clause(operator_id))
    ).one_or_none()


def models_by_fingerprint(session: Session, operator_id: uuid.UUID) -> dict[str, str]:
    """Model fingerprint → the base-model spec a trained studio recorded with it (to name a bank's model)."""
    rows = session.execute(
        select(Subject.model_info).where(Subject.weights_key.is_not(None), operator_clause(operator_id))
    ).all()
    named: dict[str, str] = {}
    for (info,) in rows:
        info = info or {}
        if info.get("fingerprint") and info.get("base_model"):
            named[str(info["fingerprint"])] = str(info["base_model"])
    return named
