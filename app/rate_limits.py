"""Rate limits that every web process shares: the counted events are rows in the database.

A counter is a :class:`Limit` (how many events in what sliding window) and what it counts (an
address, an email, a user id), stored only as a hash. The sign-in throttle (app.accounts.throttle)
and the studios-per-hour limit (app.subjects.service) are built on it. Kept in memory, a counter
would exist once per process: ``studio web --workers 4`` would allow four times as much.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.jobs.service import format_duration
from app.models import RateEvent, utcnow


@dataclass(frozen=True)
class Limit:
    scope: str
    max_events: int
    window: timedelta


# Rows older than this count for nothing (it is longer than any window) and are deleted.
KEEP_FOR = timedelta(hours=2)

Counter = tuple[Limit, str]  # a limit and what it counts (an address, an email, a user id)


def counter_key(counter: Counter) -> str:
    limit, value = counter
    return f"{limit.scope}:{hashlib.sha256(value.strip().lower().encode()).hexdigest()[:64]}"


def retry_after(session: Session, counters: Sequence[Counter], now: datetime | None = None) -> int | None:
    """Seconds until every counter allows another try, or None when one may try now."""
    now = now or utcnow()
    waits = []
    for counter in counters:
        limit = counter[0]
        recent = session.scalars(
            select(RateEvent.happened_at)
            .where(RateEvent.key == counter_key(counter), RateEvent.happened_at > now - limit.window)
            .order_by(RateEvent.happened_at.desc())
            .limit(limit.max_events)
        ).all()
        if len(recent) >= limit.max_events:
            # The oldest event that still counts has to leave the window.
            waits.append(max(1, math.ceil((recent[-1] + limit.window - now).total_seconds())))
    return max(waits, default=None)


def record(session: Session, counters: Sequence[Counter], now: datetime | None = None) -> None:
    """Count one event on each counter in ``session``'s transaction; forget rows past ``KEEP_FOR``."""
    now = now or utcnow()
    session.execute(delete(RateEvent).where(RateEvent.happened_at < now - KEEP_FOR))
    session.add_all(RateEvent(key=counter_key(counter), happened_at=now) for counter in counters)


def record_apart(factory: sessionmaker[Session], counters: Sequence[Counter], now: datetime | None = None) -> None:
    """:func:`record` in a transaction of its own: a failure counts even when the request's own
    transaction rolls back (a 401 answer)."""
    with session_scope(factory) as session:
        record(session, counters, now)


def wait_in_words(seconds: int) -> str:
    """ "45 seconds", "about 14 min": how long until the next try, as a person reads it."""
    return f"{seconds} seconds" if seconds < 90 else format_duration(seconds)


def reset(session: Session, counters: Sequence[Counter]) -> None:
    """Forget the events of ``counters`` (a sign-in that succeeded), in the request's transaction."""
    keys = [counter_key(counter) for counter in counters]
    session.execute(delete(RateEvent).where(RateEvent.key.in_(keys)))


def forget(session: Session, scopes: Sequence[str], value: str) -> None:
    """Delete the events that every counter of ``scopes`` holds for ``value`` (an account being deleted)."""
    keys = [counter_key((Limit(scope, 0, timedelta(0)), value)) for scope in scopes]
    session.execute(delete(RateEvent).where(RateEvent.key.in_(keys)))
