"""Enqueue after commit: a task is sent to the broker only once the rows it refers to are committed.

A service calls ``enqueue(session, "training.run", job_id=str(job.id))`` inside its transaction. The
task is recorded on the session and sent when that transaction commits; a rollback drops it. So a
worker never receives an id whose row does not exist (yet), and a failed request sends nothing.

Tasks are sent by name with ids only (never photo bytes or personal data), to the queue their
name routes to. A job's ``enqueued_at`` is stamped only once the broker took its message: empty
means "no message is known to be waiting for this job". A send that fails after the commit is
logged and leaves it empty, and the reaper sends the job again on its next pass (every 30 s), so a
job created while the broker was down starts soon after the broker is back. The stamps also give
the order in which workers take jobs (the queue position).

The hooks are SQLAlchemy session events, so they work under any transaction wrapper (the web's
``SessionDep``, ``session_scope``, a test's own session). ``send_pending(session)`` sends what is
recorded right now; calling it after a commit whose hook already ran is a no-op.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, update
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


def send_operator_command(task_name: str, **values: str) -> None:
    """Send an operator's command now, whose arguments are settings rather than ids (the prior fill's model
    key, class noun and count). Like every task, it carries nothing personal; the caller checked the values."""
    from worker.celery_app import queue_for

    if not all(isinstance(value, str) for value in values.values()):
        raise TypeError(f"task {task_name!r}: arguments must be strings")
    (_sender_override or _broker_send)(task_name, dict(values), queue_for(task_name))


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

    ``ids`` are ``str(uuid)`` values only. When a ``job_id`` is given, that job's ``enqueued_at`` is
    cleared in this transaction and stamped once the send after the commit succeeded (a job whose
    send failed keeps it empty, and the reaper sends it again). Raises ValueError for an unknown
    task name or a non-UUID id.
    """
    from worker.celery_app import queue_for

    queue = queue_for(task_name)
    _check_ids(task_name, ids)
    if "job_id" in ids:
        job = session.get(Job, uuid.UUID(ids["job_id"]))
        if job is None:
            raise ValueError(f"task {task_name!r}: no job with id {ids['job_id']} in this session")
        job.enqueued_at = None
    _install_hooks(session)
    session.info.setdefault(_PENDING_KEY, []).append(PendingTask(task_name, dict(ids), queue))


def pending_tasks(session: Session) -> list[PendingTask]:
    """The tasks recorded on ``session`` and not sent yet."""
    return list(session.info.get(_PENDING_KEY, []))


def send_pending(session: Session) -> int:
    """Send the recorded tasks now and forget them; returns how many were sent.

    Called by the after-commit hook; a send that fails is logged (the reaper re-sends the job later).
    A job's ``enqueued_at`` is stamped after its send succeeded, in a short transaction of its own.
    """
    tasks: list[PendingTask] = session.info.pop(_PENDING_KEY, [])
    sender = _sender_override or _broker_send
    sent = 0
    for task in tasks:
        try:
            sender(task.name, task.kwargs, task.queue)
        except Exception:
            log.exception("could not send task %s %s; the reaper will re-send it", task.name, task.kwargs)
            continue
        sent += 1
        if "job_id" in task.kwargs:
            _stamp_sent(session, task.kwargs["job_id"])
    return sent


def _stamp_sent(session: Session, job_id: str) -> None:
    """Record that the broker holds a message for the job, at the time its send returned.

    In its own transaction: the session's has just committed (this runs from its after-commit
    hook, where it can emit no SQL). If the stamp cannot be written the job looks unsent and the
    reaper sends it once more, which is harmless (a duplicate exits at the claim).
    """
    try:
        with session.get_bind().engine.connect() as connection:
            connection.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(enqueued_at=utcnow()))
            connection.commit()
    except Exception:
        log.warning("job %s was sent but its enqueued_at could not be stamped; the reaper will send it again",
                    job_id, exc_info=True)


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


# --- what the broker holds ------------------------------------------------------------------------

# kombu's Redis transport: a queue is a list under its name (and, for priorities other than 0, under
# the name + this separator + the priority); delivered, unacknowledged messages sit in one hash.
_REDIS_PRIORITY_SEPARATOR = "\x06\x16"
_REDIS_PRIORITY_STEPS = (3, 6, 9)
_REDIS_UNACKED_KEY = "unacked"


@dataclass(frozen=True)
class BrokerView:
    """The job ids the broker holds messages for, read in one look.

    ``waiting``: in a queue, not yet handed to a worker. ``delivered``: handed to a worker and not
    acknowledged yet (the worker is running or about to claim it, or it died holding it).
    """

    waiting: frozenset[str]
    delivered: frozenset[str]

    def holds(self, job_id: str) -> bool:
        return job_id in self.waiting or job_id in self.delivered


def broker_view(queue_names: list[str]) -> BrokerView | None:
    """Which jobs the broker holds messages for on ``queue_names``; None when it cannot tell.

    Only Redis can be read (the file-system broker and any error answer None: the caller then falls
    back on time). A message is recognised by its task's ``job_id`` argument.
    """
    url = studio_config.get_settings().resolved_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            with client.pipeline(transaction=True) as pipe:
                for name in queue_names:
                    pipe.lrange(name, 0, -1)
                    for priority in _REDIS_PRIORITY_STEPS:
                        pipe.lrange(f"{name}{_REDIS_PRIORITY_SEPARATOR}{priority}", 0, -1)
                pipe.hvals(_REDIS_UNACKED_KEY)
                replies = pipe.execute()
        finally:
            client.close()
    except Exception:
        log.warning("could not read the broker's queues; falling back on waiting times", exc_info=True)
        return None
    waiting = {job_id for reply in replies[:-1] for raw in reply if (job_id := _job_id_of(_json(raw)))}
    # An unacknowledged entry is [message, exchange, routing key].
    delivered = {job_id for raw in replies[-1] if (job_id := _job_id_of(_first(_json(raw))))}
    return BrokerView(frozenset(waiting), frozenset(delivered))


def broker_queue_lengths(queue_names: list[str], timeout: float = 1.0) -> dict[str, int] | None:
    """How many messages wait in each queue of the broker (priorities summed); None unless it is Redis and
    answers. For the metrics: the database counts jobs, the broker counts every task (maintenance too)."""
    url = studio_config.get_settings().resolved_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            with client.pipeline(transaction=False) as pipe:
                for name in queue_names:
                    pipe.llen(name)
                    for priority in _REDIS_PRIORITY_STEPS:
                        pipe.llen(f"{name}{_REDIS_PRIORITY_SEPARATOR}{priority}")
                replies = pipe.execute()
        finally:
            client.close()
    except Exception:
        log.warning("could not read the broker's queue lengths", exc_info=True)
        return None
    per_queue = 1 + len(_REDIS_PRIORITY_STEPS)
    return {name: sum(int(n) for n in replies[i * per_queue:(i + 1) * per_queue]) for i, name in enumerate(queue_names)}


def _json(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else None


def _job_id_of(message: Any) -> str | None:
    """The ``job_id`` argument of one kombu message (a body of [args, kwargs, embed], maybe base64)."""
    try:
        body: Any = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        job_id = json.loads(body)[1].get("job_id")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return job_id if isinstance(job_id, str) else None
