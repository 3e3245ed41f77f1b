"""CPU-queue tasks: the reaper, retention, the storage reconciler, and the purge after a subject's deletion.

The reaper ("maintenance.reap", every 30 s from beat) makes the database's view of jobs come true
whatever the broker lost:

- a running job whose heartbeat is older than the lease lost its worker: it is put back in the
  queue and re-sent (the next attempt resumes from its last checkpoint), or ends ``failed`` when its
  attempts are used up, so a job that kills its worker every time ends instead of looping;
- a queued job that was never sent (``enqueued_at`` empty: the send after commit failed, for
  example while Redis was down) is sent again on the next pass;
- a queued job whose message the broker lost (Redis emptied, or restarted without persistence) is
  sent again: with Redis the reaper reads the queues and finds the jobs that have no message there
  (a pass after the loss, so within about 30 s); with a broker it cannot read, or for a message a
  worker took and never acknowledged, once the job was sent ``queued_resend_seconds`` ago without
  starting;
- a job whose cancel was requested and whose worker is gone ends ``cancelled``.

Re-sending a job that is still in the broker is harmless: the second delivery exits at the claim.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app import db as studio_db
from app import storage as studio_storage
from app.accounts.deletion import purge_user_files
from app.accounts.email_flows import forget_old_reset_links
from app.accounts.export import remove_expired as remove_expired_exports
from app.config import Settings
from app.jobs import lease
from app.mail.outbox import resend_stale
from app.models import Job, utcnow
from app.queue import BrokerView, broker_view, enqueue
from app.storage import Storage
from app.storage.base import subject_prefix
from app.storage.reconcile import reconcile_storage
from app.subjects.deletion import purge_subject_files
from app.subjects.retention import enforce_retention
from worker.celery_app import broadcast_scratch_sweep, celery_app, queue_for
from worker.scratch import sweep_scratch
from worker.settings import get_worker_settings

log = logging.getLogger(__name__)

# A job committed without a stamp is being sent right now by the web; only after this long it was not.
NEVER_SENT_GRACE_SECONDS = 10
TASK_FOR_KIND = {"train": "training.run", "generate": "generation.run"}
TASK_QUEUES_OF_JOBS = [queue_for(task) for task in TASK_FOR_KIND.values()]
BATCH_SIZE = 200


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)  # stale running jobs put back in the queue
    resent: list[str] = field(default_factory=list)  # queued jobs sent again
    failed: list[str] = field(default_factory=list)  # attempts exhausted
    cancelled: list[str] = field(default_factory=list)  # cancel requested, worker gone
    lost: list[str] = field(default_factory=list)  # of ``resent``: sent, but the broker holds no message


BrokerReader = Callable[[list[str]], BrokerView | None]


def reap(session: Session, storage: Storage, settings: Settings, now: datetime | None = None,
         read_broker: BrokerReader = broker_view) -> ReapReport:
    """One reaper pass; flushes and records the tasks to send, which go out when the caller commits.

    ``read_broker`` tells which jobs the broker holds messages for (None: it cannot tell).
    """
    # The broker first, then the database: a job stamped as sent before this look had its message
    # in the broker when it was taken, so missing from it means lost (not "sent a moment later").
    looked_at = utcnow()
    view = read_broker(sorted(set(TASK_QUEUES_OF_JOBS)))
    now = now or utcnow()
    report = ReapReport()
    stale_before = now - timedelta(seconds=settings.lease_seconds)
    resend_before = now - timedelta(seconds=settings.queued_resend_seconds)
    never_sent_before = now - timedelta(seconds=NEVER_SENT_GRACE_SECONDS)
    stale = list(session.execute(
        select(Job)
        .where(
            or_(
                and_(Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before)),
                and_(Job.status == "queued", Job.enqueued_at.is_(None), Job.updated_at < never_sent_before),
                and_(Job.status == "queued", Job.enqueued_at < resend_before),
            )
        )
        .order_by(Job.created_at)
        .limit(BATCH_SIZE)
    ).scalars())
    if view is not None:
        lost = _lost_by_the_broker(session, view, looked_at, resend_before, {job.id for job in stale})
        report.lost = [str(job.id) for job in lost]
        stale.extend(lost)
    for job in stale:
        job_id = str(job.id)
        if job.cancel_requested:
            if _end_cancelled(session, job, now):
                storage.delete_prefix(f"{subject_prefix(job.owner_id, job.subject_id)}jobs/{job.id}/")
                report.cancelled.append(job_id)
            continue
        if job.attempts >= job.max_attempts:
            if lease.fail_if_exhausted(session, job.id, settings.lease_seconds, now=now):
                report.failed.append(job_id)
            continue
        if job.status == "queued" and view is not None and str(job.id) in view.waiting:
            continue  # waiting its turn in a long queue: its message is there
        task = TASK_FOR_KIND.get(job.kind)
        if task is None:
            log.error("job %s has unknown kind %r; not re-sent", job_id, job.kind)
            continue
        if job.status == "running":
            if not _requeue_stale(session, job, stale_before, now):
                continue  # a worker claimed or finished it a moment ago
            report.requeued.append(job_id)
        else:
            report.resent.append(job_id)
        session.expire(job)
        enqueue(session, task, job_id=job_id)
    session.flush()
    if report.requeued or report.resent or report.failed or report.cancelled:
        log.info("reaper: %d requeued, %d resent (%d lost by the broker), %d failed, %d cancelled",
                 len(report.requeued), len(report.resent), len(report.lost), len(report.failed),
                 len(report.cancelled))
    return report


def _lost_by_the_broker(session: Session, view: BrokerView, looked_at: datetime, resend_before: datetime,
                        already: set[uuid.UUID]) -> list[Job]:
    """Queued jobs stamped as sent before the broker was read (``looked_at``) whose message is not in it."""
    sent = session.execute(
        select(Job.id)
        .where(Job.status == "queued", Job.enqueued_at.is_not(None), Job.enqueued_at < looked_at,
               Job.enqueued_at >= resend_before)
        .order_by(Job.enqueued_at)
    ).scalars().all()
    missing = [job_id for job_id in sent if not view.holds(str(job_id)) and job_id not in already][:BATCH_SIZE]
    if not missing:
        return []
    return list(session.execute(select(Job).where(Job.id.in_(missing)).order_by(Job.enqueued_at)).scalars())


def _requeue_stale(session: Session, job: Job, stale_before: datetime, now: datetime) -> bool:
    """Put a running job with a stale heartbeat back to queued, unless it changed since it was read."""
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "running", Job.lease_token == job.lease_token,
               or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before))
        .values(status="queued", lease_token=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def _end_cancelled(session: Session, job: Job, now: datetime) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == job.status, Job.cancel_requested.is_(True),
               or_(Job.lease_token == job.lease_token, Job.lease_token.is_(None)))
        .values(status="cancelled", lease_token=None, finished_at=now, updated_at=now, preview_keys=[],
                eta_seconds=None)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def job_states(job_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The status of each job of ``job_ids`` that still exists (the scratch sweep's view of the database)."""
    with studio_db.session_scope() as session:
        rows = session.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all()
    return {row.id: row.status for row in rows}


def sweep_this_hosts_scratch(settings: Settings) -> list[str]:
    """Remove this host's scratch folders of dead attempts, and of jobs that are gone or final."""
    try:
        return sweep_scratch(settings.scratch_dir, job_states)
    except (OSError, SQLAlchemyError):
        log.warning("scratch sweep failed; the next pass tries again", exc_info=True)
        return []


@celery_app.task(name="maintenance.reap")
def reap_task() -> dict[str, int]:
    """Beat's reaper pass; returns counts for the log."""
    settings = get_worker_settings()
    with studio_db.session_scope() as session:
        report = reap(session, studio_storage.get_storage(), settings)
    with studio_db.session_scope() as session:
        resend_stale(session)  # messages whose mail.send task was lost
    swept = sweep_this_hosts_scratch(settings)
    return {"requeued": len(report.requeued), "resent": len(report.resent), "lost": len(report.lost),
            "failed": len(report.failed), "cancelled": len(report.cancelled), "scratch_removed": len(swept)}


@celery_app.task(name="maintenance.retention")
def retention_task() -> dict[str, int]:
    """Beat's hourly retention pass: expired studios, photos after training, expired data exports, old reset links."""
    settings = get_worker_settings()
    with studio_db.session_scope() as session:
        report = enforce_retention(session, studio_storage.get_storage(), settings)
    with studio_db.session_scope() as session:
        exports = remove_expired_exports(session, studio_storage.get_storage())
        forget_old_reset_links(session)
    return {"expired_subjects": len(report.expired_subjects), "photo_sets_removed": len(report.photo_sets_removed),
            "expired_exports": exports}


@celery_app.task(name="maintenance.reconcile_storage")
def reconcile_storage_task() -> dict[str, object]:
    """Beat's hourly storage reconciliation: objects no row refers to, older than ``orphan_min_age_seconds``,
    are removed; the report (also logged) says which."""
    settings = get_worker_settings()
    with studio_db.session_scope() as session:
        report = reconcile_storage(session, studio_storage.get_storage(), settings.orphan_min_age_seconds)
    return report.as_dict()


@celery_app.task(name="maintenance.purge_subject")
def purge_subject_task(owner_id: str, subject_id: str) -> int:
    """Delete what is left of a deleted subject's files (a worker may have written one while it was deleted),
    and have every worker remove the scratch folders of dead attempts: a killed worker's copies of the photos."""
    with studio_db.session_scope() as session:
        removed = purge_subject_files(session, studio_storage.get_storage(), owner_id, subject_id)
    sweep_this_hosts_scratch(get_worker_settings())
    try:
        broadcast_scratch_sweep()
    except Exception:
        # Each worker also sweeps when it starts and in the reaper: a missed broadcast only delays it.
        log.warning("could not broadcast the scratch sweep after deleting subject %s", subject_id, exc_info=True)
    return removed


@celery_app.task(name="maintenance.purge_user")
def purge_user_task(user_id: str) -> int:
    """Delete what is left under a deleted account's prefix (a task may have written an export meanwhile)."""
    with studio_db.session_scope() as session:
        return purge_user_files(session, studio_storage.get_storage(), user_id)
