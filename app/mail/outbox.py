"""The outbox: a message is a row written in the caller's transaction and sent by ``mail.send`` after it commits.

So a request never waits on a mail server, a rolled-back request sends nothing, and the broker
carries only the row's id (never an address or a link). The task deletes the row once the message
is handed over; a row whose task was lost is sent again by the reaper's pass
(:func:`resend_stale`).
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.mail.compose import Composed, compose
from app.mail.transport import build_message, deliver
from app.models import OutgoingEmail, utcnow
from app.queue import enqueue

log = logging.getLogger(__name__)

SEND_TASK = "mail.send"
# A queued message older than this was lost on its way (the send after commit failed, or its task
# gave up); the reaper sends it once more. Longer than the task's whole back-off.
STALE_AFTER = timedelta(hours=6)


def queue_email(session: Session, to_address: str, kind: str, **context: Any) -> OutgoingEmail:
    """Render message ``kind`` for ``to_address`` and send it once ``session`` commits (flushed, not committed)."""
    composed = compose(kind, **context)
    row = OutgoingEmail(id=uuid.uuid4(), to_address=to_address, subject=composed.subject, text_body=composed.text,
                        html_body=composed.html)
    session.add(row)
    session.flush()
    enqueue(session, SEND_TASK, email_id=str(row.id))
    return row


def send_queued(session: Session, settings: Settings, email_id: str) -> bool:
    """Deliver outbox row ``email_id`` and delete it; False when it is gone (sent already, or withdrawn).

    Delivery errors propagate (app.mail.transport): the row stays for the task's retry. The row is
    deleted in the caller's transaction after the server took the message; should that commit fail,
    a retry sends it twice, which beats never.
    """
    row = session.get(OutgoingEmail, uuid.UUID(email_id))
    if row is None:
        return False
    message = build_message(settings, row.to_address, Composed(row.subject, row.text_body, row.html_body))
    deliver(settings, message)
    session.delete(row)
    session.flush()
    return True


def drop_queued(session: Session, email_id: str) -> None:
    """Forget a message that can never be delivered (its row goes: it holds an address and links)."""
    session.execute(delete(OutgoingEmail).where(OutgoingEmail.id == uuid.UUID(email_id)))


def withdraw_for(session: Session, to_address: str) -> int:
    """Delete every queued message to ``to_address`` (an account being deleted); returns how many."""
    result = session.execute(delete(OutgoingEmail).where(OutgoingEmail.to_address == to_address))
    return int(getattr(result, "rowcount", 0) or 0)


def resend_stale(session: Session, now: datetime | None = None) -> int:
    """Enqueue ``mail.send`` again for messages queued longer than :data:`STALE_AFTER` ago.

    Each one's clock restarts, so a message is sent again at most once per :data:`STALE_AFTER`.
    """
    now = now or utcnow()
    rows = session.scalars(select(OutgoingEmail).where(OutgoingEmail.created_at < now - STALE_AFTER)
                           .limit(200)).all()
    for row in rows:
        row.created_at = now
        enqueue(session, SEND_TASK, email_id=str(row.id))
    session.flush()
    return len(rows)
