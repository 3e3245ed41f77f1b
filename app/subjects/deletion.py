"""Deleting a studio for real: every stored file under the subject's prefix and every row of it.

``delete_subject`` runs inside the caller's transaction (it flushes, never commits):

1. active jobs are asked to stop (queued ones end ``cancelled`` at once, running ones get
   ``cancel_requested``); their rows go with the subject, so a worker still running finds its job
   gone at its next fenced write or cancel check, stops, removes what it uploaded and its scratch;
2. every file under the subject's storage prefix is deleted now (photos, previews, checkpoints,
   weights, generated images, ZIPs);
3. the rows (images, generation requests, jobs, photos, the subject) are deleted;
4. after the commit, a ``maintenance.purge_subject`` task deletes the prefix once more, in case a
   worker wrote a file between steps 2 and its own stop, and has every worker sweep its scratch
   folder: a killed worker leaves copies of the photos there (worker/scratch.py);
5. this process sweeps the scratch folder under its own ``var/`` too: on one machine the web and
   the workers share it, and a killed worker that is not running any more hears no broadcast.

The shared class-prior bank is not the subject's: it holds class images ("a photo of a dog") only.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from app import config as studio_config
from app.models import GeneratedImage, GenerationRequest, Job, Photo, ShareLink, Subject, utcnow
from app.queue import enqueue
from app.storage import Storage
from app.storage.base import subject_prefix
from worker.scratch import sweep_scratch

log = logging.getLogger(__name__)


def delete_subject(session: Session, storage: Storage, subject: Subject) -> None:
    """Delete ``subject``: stop its jobs, delete its files and its rows (flushed, not committed)."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.subject_id == subject.id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
    )
    session.execute(
        update(Job)
        .where(Job.subject_id == subject.id, Job.status == "running")
        .values(cancel_requested=True, updated_at=now)
    )
    removed = storage.delete_prefix(subject_prefix(subject.owner_id, subject.id))
    for table in (ShareLink, GeneratedImage, GenerationRequest, Job, Photo):
        session.execute(
            delete(table).where(table.subject_id == subject.id).execution_options(synchronize_session=False)
        )
    owner_id, subject_id = subject.owner_id, subject.id
    session.delete(subject)
    session.flush()
    enqueue(session, "maintenance.purge_subject", owner_id=str(owner_id), subject_id=str(subject_id))
    log.info("subject %s deleted (%d files)", subject_id, removed)
    try:
        sweep_scratch(studio_config.get_settings().scratch_dir)
    except OSError:
        log.warning("could not sweep the local scratch folder; the workers' sweeps will", exc_info=True)


def purge_subject_files(session: Session, storage: Storage, owner_id: str, subject_id: str) -> int:
    """Delete the files of a subject that no longer exists; returns how many. A live subject is left alone."""
    subject_uuid, owner_uuid = uuid.UUID(subject_id), uuid.UUID(owner_id)
    if session.get(Subject, subject_uuid) is not None:
        log.warning("purge of subject %s skipped: the subject still exists", subject_id)
        return 0
    return storage.delete_prefix(subject_prefix(owner_uuid, subject_uuid))
