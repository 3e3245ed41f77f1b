"""Rate limits in the database: sliding windows, hashed keys, old rows forgotten."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app import rate_limits
from app.accounts.throttle import ACCOUNT, CLIENT
from app.models import RateEvent, utcnow
from app.rate_limits import Limit

THREE_A_MINUTE = Limit("client", 3, timedelta(seconds=60))


def events(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(RateEvent)) or 0


def test_a_window_of_failures(db_session: Session, clean_db: Engine) -> None:
    factory = sessionmaker(bind=clean_db)
    start = utcnow()
    counter = [(THREE_A_MINUTE, "1.2.3.4")]
    for seconds in (0, 10, 20):
        assert rate_limits.retry_after(db_session, counter, now=start + timedelta(seconds=seconds)) is None
        rate_limits.record_apart(factory, counter, now=start + timedelta(seconds=seconds))
    # The failure at 0 s leaves the window at 60 s.
    assert rate_limits.retry_after(db_session, counter, now=start + timedelta(seconds=21)) == 39
    assert rate_limits.retry_after(db_session, [(THREE_A_MINUTE, "5.6.7.8")], now=start + timedelta(seconds=21)) is None
    assert rate_limits.retry_after(db_session, counter, now=start + timedelta(seconds=60.5)) is None
    rate_limits.record_apart(factory, counter, now=start + timedelta(seconds=61))
    assert rate_limits.retry_after(db_session, counter, now=start + timedelta(seconds=61)) is not None
    rate_limits.reset(db_session, counter)
    assert rate_limits.retry_after(db_session, counter, now=start + timedelta(seconds=61)) is None


def test_no_address_or_email_is_stored_and_old_rows_go(db_session: Session, clean_db: Engine) -> None:
    factory = sessionmaker(bind=clean_db)
    long_ago = utcnow() - rate_limits.KEEP_FOR - timedelta(minutes=1)
    rate_limits.record_apart(factory, [(CLIENT, "203.0.113.9"), (ACCOUNT, "Ann@Example.com")], now=long_ago)
    keys = list(db_session.scalars(select(RateEvent.key)))
    assert len(keys) == 2 and not any("203.0.113.9" in key or "example" in key.lower() for key in keys)
    # The same email however it is typed is one counter.
    assert rate_limits.counter_key((ACCOUNT, " ann@example.COM")) in keys
    rate_limits.record_apart(factory, [(CLIENT, "198.51.100.1")])
    assert events(clean_db) == 1  # the rows past KEEP_FOR were deleted with the new event


def test_waits_in_words() -> None:
    assert rate_limits.wait_in_words(45) == "45 seconds"
    assert rate_limits.wait_in_words(840) == "about 14 min"
