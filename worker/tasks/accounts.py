"""The ``accounts.export`` task (cpu queue): build an account's "export my data" ZIP (app.accounts.export)."""

from __future__ import annotations

import logging
import uuid

from app import db as studio_db
from app import storage as studio_storage
from app.accounts.export import build_export, export_key
from app.models import DataExport
from worker.celery_app import celery_app
from worker.settings import get_worker_settings

log = logging.getLogger(__name__)


@celery_app.task(name="accounts.export")
def export_task(export_id: str) -> str:
    """Build export ``export_id``: "ready", "gone" (the export or its account went), or "failed".

    Should the account be deleted while the ZIP was being stored, the ZIP is deleted too (the
    deletion's own purge of the account's prefix may have run before it was written).
    """
    settings = get_worker_settings()
    storage = studio_storage.get_storage()
    export_uuid = uuid.UUID(export_id)
    with studio_db.session_scope() as session:
        export = session.get(DataExport, export_uuid)
        owner_id = export.user_id if export is not None else None
    try:
        with studio_db.session_scope() as session:
            outcome = build_export(session, storage, settings, export_id, settings.scratch_dir)
    except Exception:
        log.exception("export %s could not be built", export_id)
        with studio_db.session_scope() as session:
            failed = session.get(DataExport, export_uuid)
            if failed is not None:
                failed.status = "failed"
        return "failed"
    if owner_id is not None:
        with studio_db.session_scope() as session:
            if session.get(DataExport, export_uuid) is None:
                storage.delete(export_key(owner_id, export_uuid))
                return "gone"
    return outcome
