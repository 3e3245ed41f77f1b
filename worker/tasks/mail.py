"""The ``mail.send`` task (cpu queue): deliver one message of the outbox, retried with back-off.

A request never talks to a mail server: it writes the message into the outbox in its transaction
(app.mail.outbox) and this task, sent after the commit with the row's id only, delivers it. A
server that is down or refuses for now is tried again with exponential back-off (30 s, 1, 2, 4...
minutes, at most an hour apart); a message refused for good, or still undelivered
after the last try, is dropped with an error in the log, since the row holds an address and links.
"""

from __future__ import annotations

import logging

from celery import Task

from app import db as studio_db
from app.mail import outbox
from app.mail.transport import DeliveryError, Undeliverable
from worker.celery_app import celery_app
from worker.settings import get_worker_settings

log = logging.getLogger(__name__)

MAX_RETRIES = 8
FIRST_RETRY_SECONDS = 30
LONGEST_RETRY_SECONDS = 3600


def retry_delay(retries: int) -> int:
    """Seconds before try ``retries + 2``: 30 s doubling each time, at most an hour."""
    return int(min(LONGEST_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2**retries))


@celery_app.task(name="mail.send", bind=True, max_retries=MAX_RETRIES)
def send_email_task(self: Task, email_id: str) -> str:
    """Deliver outbox row ``email_id``: "sent", "gone" (sent already or withdrawn), or "dropped"."""
    settings = get_worker_settings()
    try:
        with studio_db.session_scope() as session:
            sent = outbox.send_queued(session, settings, email_id)
    except Undeliverable as error:
        log.error("mail %s refused for good and dropped: %s", email_id, error)
        with studio_db.session_scope() as session:
            outbox.drop_queued(session, email_id)
        return "dropped"
    except DeliveryError as error:
        retries = int(self.request.retries or 0)
        if retries >= MAX_RETRIES:
            log.error("mail %s not delivered after %d tries and dropped: %s", email_id, retries + 1, error)
            with studio_db.session_scope() as session:
                outbox.drop_queued(session, email_id)
            return "dropped"
        delay = retry_delay(retries)
        log.warning("mail %s not delivered (%s); trying again in %d s", email_id, error, delay)
        raise self.retry(countdown=delay, exc=error) from error
    return "sent" if sent else "gone"
