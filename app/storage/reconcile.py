"""The storage reconciler: removes objects that no row points to, once they are old enough.

Every path that writes to storage also removes what it wrote when it fails, but a process can die
in between: the web killed between storing a studio's sanitized photos and its commit, a worker
killed between an upload and the write that records it, a database outage that outlasts a publish.
:func:`reconcile_storage` (run hourly by the ``maintenance.reconcile_storage`` task) makes storage
agree with the database again.

An object is kept when

- a row refers to it: a photo, an image or an unexpired data export row (``storage_key``), a job's ``preview_keys``, a
  subject's ``weights_key`` folder, the ``checkpoint`` folder recorded by a queued or running job
  (a finished job resumes from nothing), a prior bank's folder;
- it is under the folder of a subject one of whose jobs is running (that worker's uploads are
  recorded as it goes; it removes what it does not publish);
- it was written less than ``min_age_seconds`` ago (a request or an attempt may be about to
  commit the row that refers to it).

Only the studio's own key space is looked at (``users/`` and ``priors/``): a bucket shared with
anything else keeps everything else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import DataExport, GeneratedImage, Job, Photo, PriorBank, Subject, utcnow
from app.models.job import ACTIVE_STATUSES
from app.storage.base import Storage, StoredObject, subject_prefix

log = logging.getLogger(__name__)

OWNED_PREFIXES = ("users/", "priors/")
REPORTED_KEYS = 100  # the most keys a report lists (the count is always complete)


@dataclass
class ReconcileReport:
    """What one pass found: the keys it removed (at most REPORTED_KEYS listed) and why others stayed."""

    removed: list[str] = field(default_factory=list)
    removed_count: int = 0
    removed_bytes: int = 0
    kept_referenced: int = 0
    kept_young: int = 0
    kept_running: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"removed": self.removed_count, "removed_bytes": self.removed_bytes, "removed_keys": self.removed,
                "kept_referenced": self.kept_referenced, "kept_young": self.kept_young,
                "kept_running": self.kept_running, "failed": self.failed}


@dataclass
class References:
    """What the database points to: exact keys, and folders (prefixes ending in "/") kept whole."""

    keys: set[str] = field(default_factory=set)
    folders: set[str] = field(default_factory=set)
    running_folders: set[str] = field(default_factory=set)

    def add_folder(self, prefix: str | None, into: set[str] | None = None) -> None:
        if prefix:
            (self.folders if into is None else into).add(prefix if prefix.endswith("/") else prefix + "/")

    @staticmethod
    def _in(key: str, folders: set[str]) -> bool:
        parts = key.split("/")
        return any("/".join(parts[:depth]) + "/" in folders for depth in range(1, len(parts)))

    def refers_to(self, key: str) -> bool:
        return key in self.keys or self._in(key, self.folders)

    def running(self, key: str) -> bool:
        return self._in(key, self.running_folders)


def load_references(session: Session) -> References:
    """Every key and folder the database points to now."""
    refs = References()
    refs.keys.update(session.execute(select(Photo.storage_key)).scalars())
    refs.keys.update(session.execute(select(GeneratedImage.storage_key)).scalars())
    exports = select(DataExport.storage_key).where(DataExport.expires_at > utcnow())
    refs.keys.update(key for key in session.execute(exports).scalars() if key)
    for preview_keys in session.execute(select(Job.preview_keys)).scalars():
        refs.keys.update(key for key in preview_keys or [] if isinstance(key, str))
    for weights_key in session.execute(select(Subject.weights_key).where(Subject.weights_key.is_not(None))).scalars():
        refs.add_folder(weights_key)
    for bank_prefix in session.execute(select(PriorBank.storage_prefix)).scalars():
        refs.add_folder(bank_prefix)
    active = session.execute(
        select(Job.details, Job.status, Job.owner_id, Job.subject_id).where(Job.status.in_(ACTIVE_STATUSES))
    ).all()
    for details, status, owner_id, subject_id in active:
        checkpoint = (details or {}).get("checkpoint")
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("prefix"), str):
            refs.add_folder(checkpoint["prefix"])
        if status == "running":
            refs.add_folder(subject_prefix(owner_id, subject_id), into=refs.running_folders)
    return refs


def _listing(storage: Storage) -> Iterable[StoredObject]:
    for prefix in OWNED_PREFIXES:
        yield from storage.list_objects(prefix)


def reconcile_storage(session: Session, storage: Storage, min_age_seconds: int,
                      now: datetime | None = None) -> ReconcileReport:
    """Remove objects no row refers to that were written more than ``min_age_seconds`` ago; report them.

    The listing is taken before the references are read, so an object written and referenced during
    the pass is young (kept) rather than missed by the reference query.
    """
    if min_age_seconds < 0:
        raise ValueError(f"min_age_seconds must not be negative, got {min_age_seconds}")
    cutoff = (now or utcnow()) - timedelta(seconds=min_age_seconds)
    objects = list(_listing(storage))
    refs = load_references(session)
    report = ReconcileReport()
    for stored in objects:
        if stored.modified_at > cutoff:
            report.kept_young += 1
        elif refs.refers_to(stored.key):
            report.kept_referenced += 1
        elif refs.running(stored.key):
            report.kept_running += 1
        else:
            try:
                storage.delete(stored.key)
            except Exception:
                log.warning("reconciler: could not delete %s; the next pass tries again", stored.key, exc_info=True)
                report.failed += 1
                continue
            report.removed_count += 1
            report.removed_bytes += stored.size
            if len(report.removed) < REPORTED_KEYS:
                report.removed.append(stored.key)
    log.info("storage reconciler: removed %d unreferenced objects (%d bytes) older than %d s%s; kept %d referenced, "
             "%d young, %d of running jobs", report.removed_count, report.removed_bytes, min_age_seconds,
             f": {', '.join(report.removed)}" if report.removed else "", report.kept_referenced, report.kept_young,
             report.kept_running)
    return report
