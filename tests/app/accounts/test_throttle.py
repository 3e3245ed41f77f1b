"""The sign-in throttle: per address, per account, and several web processes counting together."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app import rate_limits
from app.accounts.throttle import ACCOUNT, CLIENT
from app.config import Settings
from app.main import create_app
from app.models import RateEvent, User
from tests.app.conftest import PASSWORD


def failures(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(RateEvent)) or 0


def test_one_account_guessed_from_many_addresses_is_throttled(
    app: FastAPI, make_user: Callable[..., User], clean_db: Engine
) -> None:
    user = make_user()
    wrong = {"email": user.email, "password": "wrong" * 3}
    for attempt in range(ACCOUNT.max_events):
        # Each try from another address: no per-address counter fills.
        with TestClient(app, client=(f"10.0.0.{attempt}", 40000)) as botnet_member:
            assert botnet_member.post("/api/v1/auth/token", json=wrong).status_code == 401
    assert failures(clean_db) == 2 * ACCOUNT.max_events
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
        for attempt in range(CLIENT.max_events):
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
        keys = set(session.scalars(select(RateEvent.key)))
    assert keys == {rate_limits.counter_key((ACCOUNT, user.email))}
