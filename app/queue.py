"""Enqueue after commit: a task is sent to the broker only once the rows it refers to are committed.

A service calls ``enqueue(session, "training.run", job_id=str(job.id))`` inside its transaction. The
task is recorded on the session and sent when that transaction commits; a rollback drops it. So a
worker never receives an id whose row does not exist (yet), and a failed request sends nothing.

Tasks are sent by name with ids only (never photo bytes or personal data), to the queue their
name routes to. A send that fails after the commit is logged and left to the reaper, which re-sends
queued jobs that never started (the job's ``enqueued_at`` tells it how long they waited).

The hooks are SQLAlchemy session events, so they work under any transaction wrapper (the web's
``SessionDep``, ``session_scope``, a test's own session). ``send_pending(session)`` sends what is
recorded right now; calling it after a commit whose hook already ran is a no-op.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from app import config as studio_config
from app.models import Job, utcnow

log = logging.getLogger(__name__)

_PENDING_KEY = "studio.pending_tasks"
_HOOKED_KEY = "studio.queue_hooked"


@dataclass(frozen=True)
class PendingTask:
    name: str
    kwargs: dict[str, str]
    queue: str


# Sends one task to the broker: (name, kwargs, queue). Replaceable for tests that need no broker.
Sender = Callable[[str, dict[str, str], str], None]
_sender_override: Sender | None = None


def set_sender(sender: Sender | None) -> None:
    """Replace how tasks are sent (None restores the Celery broker); for tests and tools."""
    global _sender_override
    _sender_override = sender


def _broker_send(name: str, kwargs: dict[str, str], queue: str) -> None:
    celery = _celery_for_current_settings()
    celery.send_task(name, kwargs=kwargs, queue=queue)


_celery_apps: dict[tuple[Any, ...], Any] = {}


def _celery_for_current_settings() -> Any:
    """A Celery producer built from the current settings (cached per broker configuration)."""
    from worker.celery_app import create_celery  # torch-free; imported late to keep app.queue light

    settings = studio_config.get_settings()
    cache_key = (settings.resolved_broker_url, str(settings.broker_dir), settings.visibility_timeout)
    app = _celery_apps.get(cache_key)
    if app is None:
        app = create_celery(settings)
        _celery_apps[cache_key] = app
    return app


def send_now(task_name: str, **ids: str) -> None:
    """Send a task immediately (for code outside a request transaction: the reaper, tools, tests)."""
    from worker.celery_app import queue_for

    _check_ids(task_name, ids)
    (_sender_override or _broker_send)(task_name, dict(ids), queue_for(task_name))


def _check_ids(task_name: str, ids: dict[str, str]) -> None:
    if not ids:
        raise ValueError(f"task {task_name!r} needs at least one id argument")
    for name, value in ids.items():
        if not isinstance(value, str):
            raise TypeError(f"task {task_name!r}: id {name}={value!r} must be a string (str(uuid))")
        try:
            uuid.UUID(value)
        except ValueError:
            raise ValueError(f"task {task_name!r}: id {name}={value!r} is not a UUID") from None


def enqueue(session: Session, task_name: str, **ids: str) -> None:
    """Record ``task_name(**ids)`` on ``session``; it is sent after the transaction commits.

    ``ids`` are ``str(uuid)`` values only. When a ``job_id`` is given, that job's ``enqueued_at``
    is set in the same transaction. Raises ValueError for an unknown task name or a non-UUID id.
    """
    from worker.celery_app import queue_for

    queue = queue_for(task_name)
    _check_ids(task_name, ids)
    if "job_id" in ids:
        job = session.get(Job, uuid.UUID(ids["job_id"]))
        if job is None:
            raise ValueError(f"task {task_name!r}: no job with id {ids['job_id']} in this session")
        job.enqueued_at = utcnow()
    _install_hooks(session)
    session.info.setdefault(_PENDING_KEY, []).append(PendingTask(task_name, dict(ids), queue))


def pending_tasks(session: Session) -> list[PendingTask]:
    """The tasks recorded on ``session`` and not sent yet."""
    return list(session.info.get(_PENDING_KEY, []))


def send_pending(session: Session) -> int:
    """Send the recorded tasks now and forget them; returns how many were sent.

    Called by the after-commit hook; a send that fails is logged (the reaper re-sends the job later).
    """
    tasks: list[PendingTask] = session.info.pop(_PENDING_KEY, [])
    sender = _sender_override or _broker_send
    sent = 0
    for task in tasks:
        try:
            sender(task.name, task.kwargs, task.queue)
            sent += 1
        except Exception:
            log.exception("could not send task %s %s; the reaper will re-send it", task.name, task.kwargs)
    return sent


def discard_pending(session: Session) -> None:
    """Forget the recorded tasks (the transaction rolled back)."""
    session.info.pop(_PENDING_KEY, None)


def _install_hooks(session: Session) -> None:
    if session.info.get(_HOOKED_KEY):
        return
    session.info[_HOOKED_KEY] = True
    event.listen(session, "after_commit", _after_commit)
    event.listen(session, "after_soft_rollback", _after_rollback)


def _after_commit(session: Session) -> None:
    # SQLAlchemy fires this for the outermost commit only: the one that makes the rows visible.
    send_pending(session)


def _after_rollback(session: Session, previous_transaction: Any) -> None:
    # A savepoint rolling back leaves the outer transaction (and its tasks) alive.
    if previous_transaction.nested:
        return
    discard_pending(session)
