"""Sign-in throttling that every web process shares: failed password checks are rows in the database.

Counters over sliding windows, each keyed by a hash of what it counts:

- ``CLIENT``: failures from one address, so one machine cannot guess quickly;
- ``ACCOUNT``: failures against one email from anywhere, so a botnet cannot guess one person's
  password from many addresses (the price: under such an attack that person waits too);
- ``PASSWORD_CHANGE``: wrong current passwords on the account page, per account, so a stolen
  session cookie does not allow guessing the password.

A failure is written in a transaction of its own, so it counts even when the request's own
transaction rolls back (a 401 answer). Kept in memory, a counter would exist once per process:
``studio web --workers 4`` would allow four times the guesses.
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
from app.models import LoginFailure, utcnow


@dataclass(frozen=True)
class Limit:
    scope: str
    max_failures: int
    window: timedelta


CLIENT = Limit("client", 10, timedelta(minutes=5))
ACCOUNT = Limit("account", 20, timedelta(minutes=15))
PASSWORD_CHANGE = Limit("password", 10, timedelta(minutes=5))
# Rows older than this count for nothing and are deleted.
KEEP_FOR = timedelta(hours=1)

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
            select(LoginFailure.failed_at)
            .where(LoginFailure.key == counter_key(counter), LoginFailure.failed_at > now - limit.window)
            .order_by(LoginFailure.failed_at.desc())
            .limit(limit.max_failures)
        ).all()
        if len(recent) >= limit.max_failures:
            # The oldest failure that still counts has to leave the window.
            waits.append(max(1, math.ceil((recent[-1] + limit.window - now).total_seconds())))
    return max(waits, default=None)


def record_failure(factory: sessionmaker[Session], counters: Sequence[Counter], now: datetime | None = None) -> None:
    """Count one failure on each counter, in a transaction of its own; forget rows past ``KEEP_FOR``."""
    now = now or utcnow()
    with session_scope(factory) as session:
        session.execute(delete(LoginFailure).where(LoginFailure.failed_at < now - KEEP_FOR))
        session.add_all(LoginFailure(key=counter_key(counter), failed_at=now) for counter in counters)


def reset(session: Session, counters: Sequence[Counter]) -> None:
    """Forget the failures of ``counters`` (after a success), in the request's transaction."""
    keys = [counter_key(counter) for counter in counters]
    session.execute(delete(LoginFailure).where(LoginFailure.key.in_(keys)))
