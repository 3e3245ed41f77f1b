"""Sign-in throttling in the database: windows, counters, privacy, and several web processes sharing it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.accounts import throttle
from app.accounts.throttle import ACCOUNT, CLIENT, Limit
from app.config import Settings
from app.main import create_app
from app.models import LoginFailure, User, utcnow
from tests.app.conftest import PASSWORD

THREE_A_MINUTE = Limit("client", 3, timedelta(seconds=60))


def failures(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(LoginFailure)) or 0


def test_a_window_of_failures(db_session: Session, clean_db: Engine) -> None:
    factory = sessionmaker(bind=clean_db)
    start = utcnow()
    counter = [(THREE_A_MINUTE, "1.2.3.4")]
    for seconds in (0, 10, 20):
        assert throttle.retry_after(db_session, counter, now=start + timedelta(seconds=seconds)) is None
        throttle.record_failure(factory, counter, now=start + timedelta(seconds=seconds))
    # The failure at 0 s leaves the window at 60 s.
    assert throttle.retry_after(db_session, counter, now=start + timedelta(seconds=21)) == 39
    assert throttle.retry_after(db_session, [(THREE_A_MINUTE, "5.6.7.8")], now=start + timedelta(seconds=21)) is None
    assert throttle.retry_after(db_session, counter, now=start + timedelta(seconds=60.5)) is None
    throttle.record_failure(factory, counter, now=start + timedelta(seconds=61))
    assert throttle.retry_after(db_session, counter, now=start + timedelta(seconds=61)) is not None
    throttle.reset(db_session, counter)
    assert throttle.retry_after(db_session, counter, now=start + timedelta(seconds=61)) is None


def test_no_address_or_email_is_stored_and_old_rows_go(db_session: Session, clean_db: Engine) -> None:
    factory = sessionmaker(bind=clean_db)
    long_ago = utcnow() - throttle.KEEP_FOR - timedelta(minutes=1)
    throttle.record_failure(factory, [(CLIENT, "203.0.113.9"), (ACCOUNT, "Ann@Example.com")], now=long_ago)
    keys = list(db_session.scalars(select(LoginFailure.key)))
    assert len(keys) == 2 and not any("203.0.113.9" in key or "example" in key.lower() for key in keys)
    # The same email however it is typed is one counter.
    assert throttle.counter_key((ACCOUNT, " ann@example.COM")) in keys
    throttle.record_failure(factory, [(CLIENT, "198.51.100.1")])
    assert failures(clean_db) == 1  # the hour-old rows were deleted with the new failure


def test_one_account_guessed_from_many_addresses_is_throttled(
    app: FastAPI, make_user: Callable[..., User], clean_db: Engine
) -> None:
    user = make_user()
    wrong = {"email": user.email, "password": "wrong" * 3}
    for attempt in range(ACCOUNT.max_failures):
        # Each try from another address: no per-address counter fills.
        with TestClient(app, client=(f"10.0.0.{attempt}", 40000)) as botnet_member:
            assert botnet_member.post("/api/v1/auth/token", json=wrong).status_code == 401
    assert failures(clean_db) == 2 * ACCOUNT.max_failures
    with TestClient(app, client=("192.0.2.1", 40000)) as owner:
        refused = owner.post("/api/v1/auth/token", json={**wrong, "password": PASSWORD})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        other = owner.post("/api/v1/auth/token", json={"email": "someone@example.com", "password": "wrong" * 3})
        assert other.status_code == 401  # another account is not affected


def test_web_processes_share_the_count(settings: Settings, clean_db: Engine, make_user: Callable[..., User]) -> None:
    """Two apps on one database stand for two web processes: failures in one count in the other."""
    user = make_user()
    wrong = {"email": user.email, "password": "wrong" * 3}
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        for attempt in range(CLIENT.max_failures):
            assert (first if attempt % 2 else second).post("/api/v1/auth/token", json=wrong).status_code == 401
        assert first.post("/api/v1/auth/token", json=wrong).status_code == 429
        assert second.post("/api/v1/auth/token", json={**wrong, "password": PASSWORD}).status_code == 429


def test_a_success_clears_the_address_but_not_the_account(
    client: TestClient, make_user: Callable[..., User], clean_db: Engine
) -> None:
    user = make_user()
    for _ in range(3):
        assert client.post("/api/v1/auth/token", json={"email": user.email, "password": "wrong" * 3}).status_code == 401
    assert client.post("/api/v1/auth/token", json={"email": user.email, "password": PASSWORD}).status_code == 201
    with Session(clean_db) as session:
        keys = set(session.scalars(select(LoginFailure.key)))
    assert keys == {throttle.counter_key((ACCOUNT, user.email))}
