"""Deleting an account for good ("delete my account"): everything of it, from every backend.

``delete_account`` runs in the caller's transaction (it flushes, never commits):

1. every studio of the account is deleted exactly as "delete this studio" does
   (:func:`app.subjects.deletion.delete_subject`): its jobs are stopped first (queued ones end at
   once, a running one is told to cancel and, finding its row gone, removes what it wrote), then
   its files (photos, weights, checkpoints, previews, pictures, ZIPs) and rows go, and a purge
   runs after the commit;
2. whatever else is stored under the account's prefix (data exports) is deleted, and deleted once
   more by ``maintenance.purge_user`` after the commit, in case a task wrote there meanwhile;
3. its sessions, API tokens, reset links, exports, the messages still waiting for it, and the
   rate-limit rows counted on its id or email are deleted, then the account itself;
4. a last message tells the person it is done (sent after the commit, to an address no row keeps
   once it is sent).
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app import rate_limits
from app.accounts import throttle
from app.config import Settings
from app.mail import outbox, queue_email
from app.models import ApiToken, DataExport, PasswordReset, Subject, User, UserSession
from app.queue import enqueue
from app.storage import Storage
from app.subjects.deletion import delete_subject

log = logging.getLogger(__name__)


def user_prefix(user_id: uuid.UUID) -> str:
    """Every stored file of an account is under this prefix (its studios' and its exports)."""
    return f"users/{user_id}/"


def delete_account(session: Session, storage: Storage, settings: Settings, user: User) -> int:
    """Delete ``user`` and everything of it (see the module's docstring); returns how many studios went."""
    user_id, email = user.id, user.email
    subjects = list(session.scalars(select(Subject).where(Subject.owner_id == user_id)))
    for subject in subjects:
        delete_subject(session, storage, subject)
    removed = storage.delete_prefix(user_prefix(user_id))
    for table in (DataExport, PasswordReset, UserSession, ApiToken):
        session.execute(delete(table).where(table.user_id == user_id).execution_options(synchronize_session=False))
    rate_limits.forget(session, throttle.SCOPES_BY_ACCOUNT_ID, str(user_id))
    rate_limits.forget(session, throttle.SCOPES_BY_EMAIL, email)
    outbox.withdraw_for(session, email)
    session.delete(user)
    session.flush()
    enqueue(session, "maintenance.purge_user", user_id=str(user_id))
    queue_email(session, email, "account_deleted", email=email, studios=len(subjects), base_url=settings.base_url)
    log.info("account %s deleted with %d studios (%d more files)", user_id, len(subjects), removed)
    return len(subjects)


def purge_user_files(session: Session, storage: Storage, user_id: str) -> int:
    """Delete the files left under a deleted account's prefix; a live account is left alone."""
    owner = uuid.UUID(user_id)
    if session.get(User, owner) is not None:
        log.warning("purge of account %s skipped: the account still exists", user_id)
        return 0
    return storage.delete_prefix(user_prefix(owner))
