"""Export my data: a ZIP of the account's details, studios, photos and pictures (the right of access).

Asking for one writes a ``DataExport`` row (status "building") and enqueues ``accounts.export``; the
cpu task builds the ZIP in a temporary file, stores it under the account's prefix, marks the row
"ready" and emails a link to the account page's download (sign-in required). The link, and the
file, last ``settings.export_link_hours``; then :func:`remove_expired` (the hourly retention pass)
deletes both. An account asks for one export at a time.

The ZIP holds ``account.json`` (the account and every studio's settings and jobs, as the API shows
them), each studio's kept photos (sanitized copies) under ``<studio>/photos/`` and its pictures
under ``<studio>/pictures/``. Trained models are not in it: each studio page offers its own.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import uuid
import zipfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.mail import queue_email
from app.models import DataExport, GeneratedImage, Job, Photo, Subject, User, utcnow
from app.queue import enqueue
from app.storage import ObjectNotFound, Storage

log = logging.getLogger(__name__)

EXPORT_TASK = "accounts.export"


class ExportBusy(Exception):
    """An export of this account is being built already."""


def export_key(user_id: uuid.UUID, export_id: uuid.UUID) -> str:
    return f"users/{user_id}/exports/{export_id}.zip"


def request_export(session: Session, settings: Settings, user: User, now: datetime | None = None) -> DataExport:
    """Start building an export of ``user``'s data (sent after the caller commits); :class:`ExportBusy`
    while another is being built."""
    now = now or utcnow()
    building = session.scalars(select(DataExport).where(DataExport.user_id == user.id,
                                                        DataExport.status == "building")).first()
    if building is not None:
        raise ExportBusy("Your data export is being prepared already: you get an email when it is ready.")
    export = DataExport(id=uuid.uuid4(), user_id=user.id, status="building",
                        expires_at=now + timedelta(hours=settings.export_link_hours))
    session.add(export)
    session.flush()
    enqueue(session, EXPORT_TASK, export_id=str(export.id))
    return export


def live_export(session: Session, user_id: uuid.UUID, export_id: uuid.UUID,
                now: datetime | None = None) -> DataExport | None:
    """The owner's export that has not expired; None for another account's, an unknown or an expired one."""
    export = session.scalars(select(DataExport).where(DataExport.id == export_id,
                                                      DataExport.user_id == user_id)).first()
    if export is None or export.expires_at <= (now or utcnow()):
        return None
    return export


def ready_download(session: Session, user_id: uuid.UUID, export_id: uuid.UUID) -> tuple[str, str] | None:
    """(storage key, file name) of the owner's export while it is ready to download; None otherwise
    (another account's, unknown, still building, failed or expired)."""
    export = live_export(session, user_id, export_id)
    if export is None or export.status != "ready" or export.storage_key is None:
        return None
    return export.storage_key, f"studio-export-{export.created_at:%Y-%m-%d}.zip"


def exports_of(session: Session, user_id: uuid.UUID, now: datetime | None = None) -> list[DataExport]:
    """The owner's exports that have not expired, newest first."""
    return list(session.scalars(select(DataExport).where(DataExport.user_id == user_id,
                                                         DataExport.expires_at > (now or utcnow()))
                                .order_by(DataExport.created_at.desc())))


def _folder_name(subject: Subject) -> str:
    plain = re.sub(r"[^A-Za-z0-9._-]+", "-", subject.name).strip("-.")[:40] or "studio"
    return f"{plain}-{str(subject.id)[:8]}"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def describe_account(session: Session, user: User) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``account.json``'s content and the stored files to add as (key, name in the ZIP)."""
    files: list[tuple[str, str]] = []
    studios = []
    for subject in session.scalars(select(Subject).where(Subject.owner_id == user.id).order_by(Subject.created_at)):
        folder = _folder_name(subject)
        photos = list(session.scalars(select(Photo).where(Photo.subject_id == subject.id).order_by(Photo.position)))
        images = list(session.scalars(select(GeneratedImage).where(GeneratedImage.subject_id == subject.id)
                                      .order_by(GeneratedImage.created_at)))
        jobs = list(session.scalars(select(Job).where(Job.subject_id == subject.id).order_by(Job.created_at)))
        files += [(photo.storage_key, f"{folder}/photos/{photo.position + 1:02d}.jpg") for photo in photos]
        files += [(image.storage_key, f"{folder}/pictures/{image.id}.png") for image in images]
        studios.append({
            "id": str(subject.id), "name": subject.name, "kind": subject.kind, "class_noun": subject.class_noun,
            "style_pack": subject.style_pack, "prompts": subject.prompts, "quality": subject.quality,
            "base_model": subject.base_model, "created_at": _iso(subject.created_at),
            "consent_at": _iso(subject.consent_at), "expires_at": _iso(subject.expires_at),
            "folder": folder,
            "photos": [{"file": f"{folder}/photos/{photo.position + 1:02d}.jpg", "original_name": photo.original_name}
                       for photo in photos],
            "pictures": [{"file": f"{folder}/pictures/{image.id}.png", "prompt": image.prompt, "seed": image.seed,
                          "favourite": image.favourite, "rank": image.rank} for image in images],
            "jobs": [{"id": str(job.id), "kind": job.kind, "status": job.status, "created_at": _iso(job.created_at),
                      "finished_at": _iso(job.finished_at), "failure_reason": job.failure_reason} for job in jobs],
        })
    account = {
        "email": user.email, "created_at": _iso(user.created_at), "email_verified_at": _iso(user.email_verified_at),
        "notify_by_email": user.notify_by_email, "exported_at": _iso(utcnow()), "studios": studios,
    }
    return account, files


def build_export(session: Session, storage: Storage, settings: Settings, export_id: str,
                 scratch_dir: Path | None = None) -> str:
    """Build, store and announce export ``export_id``: "ready", or "gone" when it (or its account) went meanwhile."""
    export = session.get(DataExport, uuid.UUID(export_id))
    if export is None or export.status != "building":
        return "gone"
    user = session.get(User, export.user_id)
    if user is None:
        return "gone"
    account, files = describe_account(session, user)
    key = export_key(user.id, export.id)
    if scratch_dir is not None:
        scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix="export-") as folder:
        path = Path(folder) / "export.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:  # JPEG and PNG: no gain
            archive.writestr("account.json", json.dumps(account, indent=2, ensure_ascii=False))
            piece = Path(folder) / "piece"
            for stored_key, name in files:
                try:
                    storage.download_to(stored_key, piece)  # one file at a time on disk, never all in memory
                except ObjectNotFound:
                    log.warning("export %s: %s is no longer stored; left out", export_id, stored_key)
                    continue
                archive.write(piece, name)
                piece.unlink()
        storage.put_file(key, path, "application/zip")
    export.status, export.storage_key = "ready", key
    session.flush()
    queue_email(session, user.email, "export_ready", base_url=settings.base_url, hours=settings.export_link_hours,
                link=f"{settings.base_url.rstrip('/')}/account/exports/{export.id}")
    return "ready"


def remove_expired(session: Session, storage: Storage, now: datetime | None = None) -> int:
    """Delete expired exports: their ZIPs, then their rows; returns how many."""
    expired = list(session.scalars(select(DataExport).where(DataExport.expires_at <= (now or utcnow()))))
    for export in expired:
        if export.storage_key:
            storage.delete(export.storage_key)
    if expired:
        session.execute(delete(DataExport).where(DataExport.id.in_([export.id for export in expired])))
    return len(expired)
