"""Emails about a studio's training: "your studio is ready" and "your studio failed".

Called where a job turns final on the worker's side (app.jobs.lease: the fenced finish and the
give-up after too many lost workers), in that same transaction: the message exists exactly when
the job's new status does, and leaves after the commit. Only trainings are announced ("generate
more" is something the person is watching), and only to owners who kept notifications on (the
account page turns them off).

A message carries a link to the studio's page and, for a failure, the sentence that page shows;
never a picture, never a photo: those stay behind the sign-in.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import config as studio_config
from app.mail import queue_email
from app.models import Job, Subject, User

log = logging.getLogger(__name__)


def job_ended(session: Session, job_id: uuid.UUID, status: str) -> bool:
    """Queue the message for a training job that just became ``status`` (done or failed); True when queued."""
    if status not in ("done", "failed"):
        return False
    row = session.execute(
        select(Job.kind, Job.failure_reason, Subject.id, Subject.name, User.email, User.notify_by_email)
        .join(Subject, Subject.id == Job.subject_id)
        .join(User, User.id == Job.owner_id)
        .where(Job.id == job_id)
    ).first()
    if row is None or row.kind != "train" or not row.notify_by_email:
        return False
    settings = studio_config.get_settings()
    context = {"name": row.name, "base_url": settings.base_url,
               "link": f"{settings.base_url.rstrip('/')}/studios/{row.id}"}
    if status == "done":
        queue_email(session, row.email, "studio_ready", **context)
    else:
        queue_email(session, row.email, "studio_failed", reason=row.failure_reason or "It stopped without a reason.",
                    **context)
    return True
