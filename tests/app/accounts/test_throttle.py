"""The sign-in throttle: per address, per account, several web processes counting together, and
forwarded addresses believed only from the configured proxies. The sign-up limit per address."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app import cli, rate_limits
from app.accounts.throttle import ACCOUNT, CLIENT
from app.config import Settings
from app.main import create_app
from app.models import RateEvent, User
from tests.app.conftest import PASSWORD, page_context
from tests.app.serving import serving


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


@contextmanager
def served_like_studio_web(settings: Settings) -> Iterator[str]:
    """The app under a real uvicorn with the options ``studio web`` gives it, on loopback."""
    with serving(create_app(settings), **cli.WEB_SERVER_OPTIONS) as url:
        yield url


def wrong_password_from(url: str, forwarded_for: str, attempt: int) -> int:
    """One failed sign-in claiming to come from ``forwarded_for``, each for another account."""
    response = httpx.post(f"{url}/api/v1/auth/token", headers={"X-Forwarded-For": forwarded_for},
                          json={"email": f"guess{attempt}@example.com", "password": "wrong" * 3})
    return response.status_code


def test_a_rotating_forwarded_header_from_an_untrusted_peer_does_not_escape_the_limit(
    settings: Settings, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No trusted proxy (the default): the header is the client's own words, even with the
    FORWARDED_ALLOW_IPS="*" that docker-compose used to set, and the peer's address is counted."""
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    assert settings.trusted_proxies == []
    with served_like_studio_web(settings) as url:
        answers = [wrong_password_from(url, f"203.0.113.{attempt}", attempt) for attempt in range(CLIENT.max_events)]
        assert answers == [401] * CLIENT.max_events
        assert wrong_password_from(url, "198.51.100.77", CLIENT.max_events) == 429


def test_a_configured_proxys_forwarded_header_is_honoured(settings: Settings, clean_db: Engine) -> None:
    behind_proxy = settings.model_copy(update={"trusted_proxies": ["127.0.0.1"]})
    with served_like_studio_web(behind_proxy) as url:
        # Many clients behind one proxy: each is counted on its own address.
        rotating = [wrong_password_from(url, f"203.0.113.{n}", n) for n in range(CLIENT.max_events + 2)]
        assert rotating == [401] * (CLIENT.max_events + 2)
        # One client through the proxy has a limit of its own.
        one = [wrong_password_from(url, "192.0.2.1", 100 + n) for n in range(CLIENT.max_events)]
        assert one == [401] * CLIENT.max_events
        assert wrong_password_from(url, "192.0.2.1", 200) == 429
        assert wrong_password_from(url, "192.0.2.2", 201) == 401
        # The proxy appends the peer it saw to what the client sent: the rightmost entry counts.
        assert wrong_password_from(url, "203.0.113.250, 192.0.2.1", 202) == 429


def test_trusted_proxies_may_be_networks(settings: Settings, clean_db: Engine) -> None:
    app = create_app(settings.model_copy(update={"trusted_proxies": ["10.1.2.0/24"]}))
    emails = (f"nobody{n}@example.com" for n in range(100))  # another account each time: only addresses count

    def wrong(client: TestClient, forwarded_for: str | None = None) -> int:
        headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
        body = {"email": next(emails), "password": "wrong" * 3}
        return client.post("/api/v1/auth/token", json=body, headers=headers).status_code

    with TestClient(app, client=("10.1.2.3", 40000)) as through_proxy, \
            TestClient(app, client=("192.0.2.9", 40000)) as direct:
        assert [wrong(through_proxy, f"203.0.113.{n}") for n in range(CLIENT.max_events)] == [401] * CLIENT.max_events
        assert [wrong(direct, "203.0.113.250") for _ in range(CLIENT.max_events)] == [401] * CLIENT.max_events
        # The direct peer's failures were counted on 192.0.2.9, not on the address it claimed.
        assert wrong(direct) == 429
        assert wrong(through_proxy, "203.0.113.250") == 401


def accounts(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(User)) or 0


def test_sign_ups_are_limited_per_address(settings: Settings, clean_db: Engine) -> None:
    app = create_app(settings.model_copy(update={"max_signups_per_hour": 3}))
    with TestClient(app, client=("192.0.2.1", 40000)) as one, TestClient(app, client=("192.0.2.2", 40000)) as other:
        # Refusals that hash nothing do not count: a taken email, a short password.
        assert one.post("/api/v1/auth/signup", json={"email": "a@example.com", "password": "short"}).status_code == 400
        for n in range(3):
            created = one.post("/api/v1/auth/signup", json={"email": f"user{n}@example.com", "password": PASSWORD})
            assert created.status_code == 201, created.text
            taken = one.post("/api/v1/auth/signup", json={"email": f"user{n}@example.com", "password": PASSWORD})
            assert taken.status_code == (409 if n < 2 else 429)
        refused = one.post("/api/v1/auth/signup", json={"email": "fourth@example.com", "password": PASSWORD})
        assert refused.status_code == 429
        assert 3000 < int(refused.headers["retry-after"]) <= 3600
        assert refused.json()["detail"].startswith("Too many accounts were created from your network")
        assert accounts(clean_db) == 3
        # Another address is not affected.
        assert other.post("/api/v1/auth/signup", json={"email": "x@example.com", "password": PASSWORD}).status_code \
            == 201

        # The page says so in a sentence, with the same Retry-After, and keeps what was typed.
        page = one.get("/signup")
        answer = one.post("/signup", data={"email": "fifth@example.com", "password": PASSWORD,
                                           "csrf_token": page_context(page)["csrf_token"]}, follow_redirects=False)
        assert answer.status_code == 429 and int(answer.headers["retry-after"]) > 3000
        assert "Too many accounts were created from your network in the last hour. Try again in" in answer.text
        assert page_context(answer)["email"] == "fifth@example.com"
    assert accounts(clean_db) == 4


def test_web_processes_share_the_sign_up_count(settings: Settings, clean_db: Engine) -> None:
    limited = settings.model_copy(update={"max_signups_per_hour": 2})
    with TestClient(create_app(limited)) as first, TestClient(create_app(limited)) as second:
        assert first.post("/api/v1/auth/signup", json={"email": "p1@example.com", "password": PASSWORD}).status_code \
            == 201
        assert second.post("/api/v1/auth/signup", json={"email": "p2@example.com", "password": PASSWORD}).status_code \
            == 201
        assert first.post("/api/v1/auth/signup", json={"email": "p3@example.com", "password": PASSWORD}).status_code \
            == 429


def test_zero_means_no_sign_up_limit(settings: Settings, clean_db: Engine) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_signups_per_hour": 0}))) as client:
        for n in range(8):
            body = {"email": f"many{n}@example.com", "password": PASSWORD}
            assert client.post("/api/v1/auth/signup", json=body).status_code == 201
    assert failures(clean_db) == 0  # nothing is counted
