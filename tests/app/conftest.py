"""Fixtures for every web test: the app, a client, accounts, signing in, tokens, CSRF tokens.

    def test_something(client, make_user, login, api_headers, csrf_token):
        user = make_user("ann@example.com")
        login(client, user)                      # through the real /login form; the client keeps the cookie
        client.post("/somewhere", data={"csrf_token": csrf_token(client)})
        client.get("/api/v1/me", headers=api_headers(user))

``live_url`` serves ``app`` with a real uvicorn for browser tests. Every user's password is
``PASSWORD``. Password hashing uses cheap argon2 parameters in tests. ``page_context(response)`` and
``page_template(response)`` read what a page was rendered from.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app import security
from app.accounts import service as accounts_service
from app.config import Settings
from app.main import create_app
from app.models import User
from app.storage import Storage

PASSWORD = "correct horse battery"


# The test client's responses are httpx (or httpx2) Responses, depending on what is installed.
def page_context(response: Any) -> dict[str, Any]:
    """The template context of a rendered page (Starlette's test client attaches it to the response)."""
    context = getattr(response, "context", None)
    assert isinstance(context, dict), f"not a rendered template: {response.status_code} {response.text[:200]}"
    return context


def page_template(response: Any) -> str:
    """The name of the template a page was rendered from."""
    template = getattr(response, "template", None)
    assert template is not None, f"not a rendered template: {response.status_code} {response.text[:200]}"
    return str(template.name)


@pytest.fixture(autouse=True)
def fast_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2 with its smallest cost: the tests check behaviour, not hashing strength."""
    monkeypatch.setattr(security, "password_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    monkeypatch.setattr(accounts_service, "_DUMMY_HASH", None)


@pytest.fixture
def app(settings: Settings, clean_db: Engine) -> FastAPI:
    """The studio's app on the test settings; the database is emptied after the test."""
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A browser-like client (keeps cookies); the app's lifespan runs around the test."""
    with TestClient(app, base_url="http://testserver") as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def live_url(app: FastAPI) -> Iterator[str]:
    """``app`` served by a real uvicorn on a free loopback port (in a thread), for browser tests."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the live server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def make_user(clean_db: Engine, settings: Settings) -> Callable[..., User]:
    """``make_user(email=None, password=PASSWORD) -> User``: a committed account that can sign in."""
    factory = sessionmaker(bind=clean_db, expire_on_commit=False)
    counter = iter(range(1, 1_000_000))

    def make(email: str | None = None, password: str = PASSWORD) -> User:
        with factory() as session:
            user = accounts_service.sign_up(session, email or f"user{next(counter)}@example.com", password)
            session.commit()
            return user

    return make


@pytest.fixture
def login() -> Callable[..., TestClient]:
    """``login(client, user, password=PASSWORD) -> client``: signs in through the real /login form."""

    def sign_in(client: TestClient, user: User, password: str = PASSWORD) -> TestClient:
        page = client.get("/login")
        assert page.status_code == 200, page.text
        response = client.post(
            "/login",
            data={"email": user.email, "password": password, "csrf_token": page_context(page)["csrf_token"]},
            follow_redirects=False,
        )
        assert response.status_code == 303, f"login of {user.email} failed: {response.status_code} {response.text}"
        return client

    return sign_in


@pytest.fixture
def api_headers(clean_db: Engine) -> Callable[[User], dict[str, str]]:
    """``api_headers(user) -> {"Authorization": "Bearer ..."}`` with a fresh token of ``user``."""
    factory = sessionmaker(bind=clean_db, expire_on_commit=False)

    def headers(user: User) -> dict[str, str]:
        with factory() as session:
            owner = session.get(User, user.id)
            assert owner is not None, "api_headers needs a committed user"
            created = accounts_service.create_api_token(session, owner, "test token")
            session.commit()
        return {"Authorization": f"Bearer {created.token}"}

    return headers


@pytest.fixture
def csrf_token() -> Callable[[TestClient], str]:
    """``csrf_token(client) -> str``: the token the client's next form post must carry (signed in or not)."""

    def token(client: TestClient) -> str:
        response = client.get("/")
        assert response.status_code == 200, response.text
        value = page_context(response)["csrf_token"]
        assert isinstance(value, str) and value
        return value

    return token


@pytest.fixture
def db(clean_db: Engine) -> Iterator[Session]:
    """A session for arranging rows; the test commits so the app's own sessions see them."""
    session = sessionmaker(bind=clean_db, expire_on_commit=False)()
    yield session
    session.rollback()
    session.close()


@pytest.fixture
def app_storage(app: FastAPI) -> Storage:
    """The storage the app serves from."""
    storage: Storage = app.state.storage
    return storage
