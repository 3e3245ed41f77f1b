"""What an account used this month, for the monthly quotas an operator sets (studios, GPU minutes).

Months are calendar months in UTC. GPU time is a job's worker time: from its start to its end (or its
last heartbeat while it runs). Both come from rows, so a deleted studio no longer counts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.models import Job, Subject, User, utcnow


def month_start(now: datetime | None = None) -> datetime:
    """The first instant of the current calendar month (UTC)."""
    now = now or utcnow()
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(now: datetime | None = None) -> datetime:
    start = month_start(now)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def gpu_seconds(started: datetime, finished: datetime | None, heartbeat: datetime | None,
                since: datetime | None = None) -> float:
    """Worker time of one job, counting only what falls after ``since``."""
    end = finished or heartbeat or started
    begin = max(started, since) if since is not None else started
    return max(0.0, (end - begin).total_seconds())


def studios_this_month(session: Session, owner_id: uuid.UUID, now: datetime | None = None) -> int:
    query = select(func.count()).select_from(Subject).where(Subject.owner_id == owner_id,
                                                            Subject.created_at >= month_start(now))
    return session.scalar(query) or 0


def gpu_minutes_this_month(session: Session, owner_id: uuid.UUID, now: datetime | None = None) -> float:
    since = month_start(now)
    rows = session.execute(
        select(Job.started_at, Job.finished_at, Job.heartbeat_at).where(
            Job.owner_id == owner_id, Job.started_at.is_not(None),
            or_(Job.finished_at.is_(None), Job.finished_at >= since),
        )
    ).all()
    seconds = 0.0
    for started, finished, beat in rows:
        if started is not None:
            seconds += gpu_seconds(started, finished, beat, since)
    return seconds / 60


@dataclass(frozen=True)
class QuotaUsed:
    """A monthly quota the account has used up: the sentence to show, and seconds until it resets."""

    message: str
    retry_after: int


def quota_used(session: Session, owner: User, *, studios: bool, now: datetime | None = None) -> QuotaUsed | None:
    """The monthly quota ``owner`` has used up, or None. ``studios``: the studio count counts too (a new
    studio); otherwise only GPU minutes do ("generate more"). Quotas reset on the 1st of the month, UTC."""
    if owner.studios_per_month is None and owner.gpu_minutes_per_month is None:
        return None
    now = now or utcnow()
    next_month = next_month_start(now)
    wait = max(1, int((next_month - now).total_seconds()))
    when = f"{next_month.day} {next_month:%B}"
    quota = owner.studios_per_month
    if studios and quota is not None and studios_this_month(session, owner.id, now) >= quota:
        count = "no studios" if quota == 0 else ("1 studio" if quota == 1 else f"{quota} studios")
        return QuotaUsed(f"Your account may create {count} a month and this month's are used. "
                         f"You can start the next one on {when}.", wait)
    minutes = owner.gpu_minutes_per_month
    if minutes is not None and gpu_minutes_this_month(session, owner.id, now) >= minutes:
        return QuotaUsed(f"Your account has used this month's {minutes} GPU minutes. "
                         f"You can start new work on {when}.", wait)
    return None
