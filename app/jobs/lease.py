"""The worker side of a job's lease: claim, heartbeat, fenced progress and fenced finish.

The database is the source of truth, not the broker. A worker claims a job with ONE conditional
UPDATE that writes a fresh ``lease_token`` and bumps ``attempts``; every later write is fenced by
``WHERE id = :id AND lease_token = :token AND status = 'running'`` and reports whether it won. A worker
whose lease was taken over (its heartbeat went stale and the job was re-claimed) loses every write
and publishes nothing. A duplicate delivery of a task finds the job claimed, done or cancelled and
exits at the claim.

Each function executes its statement on the caller's session and does not commit: the worker wraps
each call in its own short transaction, so a claim or a heartbeat is visible at once.

Times come from the worker's clock (UTC); the workers and the web must keep their clocks in sync
(NTP) to within a small fraction of ``lease_seconds``.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, and_, func, literal, or_, select, update
from sqlalchemy.orm import Session

from app.models import Job, utcnow

TERMINAL_STATUSES = ("done", "failed", "cancelled")
# Columns a worker may write with update_progress; the lease columns are never among them.
PROGRESS_FIELDS = frozenset({"stage", "step", "total", "loss", "eta_seconds", "details", "preview_keys"})


def exhausted_reason(attempts: int) -> str:
    """The failure a person reads when a job's worker died on every attempt."""
    times = "once" if attempts == 1 else f"{attempts} times"
    return (
        f"The worker stopped unexpectedly {times} while running this job (for example it ran out of memory "
        "or was restarted), so the studio gave up. Try again, perhaps with the fast preset or fewer photos."
    )


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def _as_uuid(job_id: uuid.UUID | str) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(job_id)


def claim(session: Session, job_id: uuid.UUID | str, worker_id: str, lease_seconds: int,
          now: datetime | None = None) -> str | None:
    """Take the lease on a job and return its new token, or None when the job is not claimable.

    Claimable: queued, or running with a heartbeat older than ``lease_seconds`` (its worker is gone);
    fewer attempts than the cap; no cancel requested. The claim bumps ``attempts``, sets
    ``heartbeat_at`` and keeps the first ``started_at``. ``worker_id`` names the claimer
    ("host:pid" for a worker process) and is recorded as the job's ``lease_holder``.
    """
    if lease_seconds <= 0:
        raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
    if not worker_id:
        raise ValueError("worker_id must name the claiming worker")
    now = now or utcnow()
    token = uuid.uuid4().hex
    stale_before = now - timedelta(seconds=lease_seconds)
    result = session.execute(
        update(Job)
        .where(
            Job.id == _as_uuid(job_id),
            or_(Job.status == "queued", and_(Job.status == "running", Job.heartbeat_at < stale_before)),
            Job.attempts < Job.max_attempts,
            Job.cancel_requested.is_(False),
        )
        .values(
            status="running",
            lease_token=token,
            lease_holder=worker_id[:255],
            attempts=Job.attempts + 1,
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, literal(now, Job.started_at.type)),
            finished_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return token if _rowcount(result) == 1 else None


def take_over(session: Session, job_id: uuid.UUID | str, worker_id: str, dead_token: str, dead_holder: str,
              now: datetime | None = None) -> str | None:
    """Claim a running job whose lease holder is known to be dead, without waiting for the lease to go stale.

    The caller proved ``dead_holder`` dead (a process of this host that no longer exists). Fenced on
    the dead attempt's token and holder: if anyone claimed, finished or cancelled the job since,
    nothing changes and None is returned. Same bookkeeping as :func:`claim`.
    """
    if not worker_id:
        raise ValueError("worker_id must name the claiming worker")
    now = now or utcnow()
    token = uuid.uuid4().hex
    result = session.execute(
        update(Job)
        .where(
            Job.id == _as_uuid(job_id),
            Job.status == "running",
            Job.lease_token == dead_token,
            Job.lease_holder == dead_holder,
            Job.attempts < Job.max_attempts,
            Job.cancel_requested.is_(False),
        )
        .values(status="running", lease_token=token, lease_holder=worker_id[:255], attempts=Job.attempts + 1,
                heartbeat_at=now, finished_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return token if _rowcount(result) == 1 else None


def _fenced(job_id: uuid.UUID | str, token: str) -> Any:
    return update(Job).where(Job.id == _as_uuid(job_id), Job.lease_token == token, Job.status == "running")


def heartbeat(session: Session, job_id: uuid.UUID | str, token: str, now: datetime | None = None) -> bool:
    """Renew the lease; False when it was lost (taken over, finished, cancelled or the job deleted)."""
    now = now or utcnow()
    result = session.execute(
        _fenced(job_id, token).values(heartbeat_at=now, updated_at=now).execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def _check_progress_fields(values: dict[str, Any]) -> None:
    unknown = set(values) - PROGRESS_FIELDS
    if unknown:
        raise ValueError(f"not progress fields: {', '.join(sorted(unknown))}")


def update_progress(session: Session, job_id: uuid.UUID | str, token: str, now: datetime | None = None,
                    **values: Any) -> bool:
    """Write progress columns (stage, step, total, loss, eta_seconds, details, preview_keys) under the lease.

    Also renews the heartbeat. Returns False when the lease was lost; raises ValueError for a column
    that is not a progress column.
    """
    _check_progress_fields(values)
    now = now or utcnow()
    result = session.execute(
        _fenced(job_id, token)
        .values(**values, heartbeat_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def finish(session: Session, job_id: uuid.UUID | str, token: str, status: str, *,
           failure_reason: str | None = None, now: datetime | None = None, **values: Any) -> bool:
    """End the job as done, failed or cancelled under the lease; False when the lease was lost.

    ``values`` may set progress columns in the same statement (the final stage, details...). Publishing
    results must happen in the same transaction as this call, so that a loser publishes nothing. A
    training that ends done or failed queues its owner's email in this transaction too.
    """
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"finish status must be one of {', '.join(TERMINAL_STATUSES)}, got {status!r}")
    if status == "failed" and not failure_reason:
        raise ValueError("a failed job needs a failure_reason a person can read")
    _check_progress_fields(values)
    now = now or utcnow()
    result = session.execute(
        _fenced(job_id, token)
        .values(**values, status=status, failure_reason=failure_reason, finished_at=now, updated_at=now,
                eta_seconds=None)
        .execution_options(synchronize_session=False)
    )
    won = _rowcount(result) == 1
    if won:
        _announce(session, _as_uuid(job_id), status)
    return won


def _announce(session: Session, job_id: uuid.UUID, status: str) -> None:
    """The owner's "ready" or "failed" email, in the transaction that ends the job (app.accounts.notifications)."""
    from app.accounts.notifications import job_ended  # late: this module stays free of the mail machinery

    job_ended(session, job_id, status)


def holds_lease(session: Session, job_id: uuid.UUID | str, token: str) -> bool:
    """True while ``token`` still holds a running job's lease."""
    found = session.execute(
        select(Job.id).where(Job.id == _as_uuid(job_id), Job.lease_token == token, Job.status == "running")
    ).first()
    return found is not None


def should_stop(session: Session, job_id: uuid.UUID | str, token: str) -> str | None:
    """Why a running worker must stop now ("cancelled", "lost", "deleted"), or None to go on."""
    row = session.execute(
        select(Job.status, Job.lease_token, Job.cancel_requested).where(Job.id == _as_uuid(job_id))
    ).first()
    if row is None:
        return "deleted"
    if row.lease_token != token or row.status != "running":
        return "lost"
    if row.cancel_requested:
        return "cancelled"
    return None


def fail_if_exhausted(session: Session, job_id: uuid.UUID | str, lease_seconds: int,
                      now: datetime | None = None) -> bool:
    """End a job whose worker died on every attempt as failed; True when this call ended it.

    Applies to a job with ``attempts >= max_attempts`` that is queued, or running with a heartbeat
    older than ``lease_seconds`` (a live worker's job is never touched). One conditional UPDATE.
    """
    now = now or utcnow()
    attempts = session.execute(select(Job.attempts).where(Job.id == _as_uuid(job_id))).scalar_one_or_none()
    if attempts is None:
        return False
    stale_before = now - timedelta(seconds=lease_seconds)
    result = session.execute(
        update(Job)
        .where(
            Job.id == _as_uuid(job_id),
            Job.attempts == attempts,
            Job.attempts >= Job.max_attempts,
            or_(
                Job.status == "queued",
                and_(Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before)),
            ),
        )
        .values(status="failed", failure_reason=exhausted_reason(attempts), finished_at=now, updated_at=now,
                lease_token=None, eta_seconds=None)
        .execution_options(synchronize_session=False)
    )
    won = _rowcount(result) == 1
    if won:
        _announce(session, _as_uuid(job_id), "failed")
    return won
