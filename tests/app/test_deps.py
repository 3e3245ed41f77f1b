"""The request dependencies: the transaction per request, who is asking, CSRF, form limits."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app import security
from app.config import Settings
from app.deps import (
    ApiUser,
    OptionalUser,
    PageUser,
    SessionDep,
    close_form_after_request,
    parse_uuid,
    read_form,
    require_csrf,
    run_as_api_user,
)
from app.main import create_app
from app.models import User
from app.security import SESSION_COOKIE
from tests.app.serving import serving

router = APIRouter()


@router.post("/test/users/{email}")
def add_user(email: str, session: SessionDep, fail: bool = False) -> dict[str, str]:
    session.add(User(email=email, password_hash="x"))
    session.flush()
    if fail:
        raise HTTPException(status_code=400, detail="refused after writing")
    return {"email": email}


@router.post("/test/one-trip/{email}")
async def add_user_in_one_trip(email: str, request: Request, fail: bool = False) -> dict[str, str]:
    def work(session: Session, user: User) -> dict[str, str]:
        session.add(User(email=email, password_hash="x"))
        session.flush()
        if fail:
            raise HTTPException(status_code=400, detail="refused after writing")
        return {"email": email, "by": user.email}

    return await run_as_api_user(request, work)


@router.get("/test/page")
def page(user: PageUser) -> dict[str, str]:
    return {"email": user.email}


@router.get("/test/optional")
def optional(user: OptionalUser) -> dict[str, str | None]:
    return {"email": user.email if user else None}


@router.get("/test/api")
def api(user: ApiUser) -> dict[str, str]:
    return {"email": user.email}


@router.post("/test/csrf", dependencies=[Depends(require_csrf)])
def csrf_protected() -> dict[str, bool]:
    return {"ok": True}


@router.post("/test/form", dependencies=[Depends(close_form_after_request)])
async def form(request: Request) -> dict[str, int]:
    parsed = await read_form(request)
    return {"files": len(parsed.getlist("photos"))}


@pytest.fixture
def test_client(settings: Settings, clean_db: Engine) -> Iterator[TestClient]:
    app: FastAPI = create_app(settings.model_copy(update={"max_photos": 3}))
    app.include_router(router)
    with TestClient(app) as client:
        yield client


def emails(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(User.email)))


def test_the_request_commits_on_success_and_rolls_back_on_error(test_client: TestClient, clean_db: Engine) -> None:
    assert test_client.post("/test/users/kept@example.com").status_code == 200
    assert emails(clean_db) == ["kept@example.com"]
    assert test_client.post("/test/users/dropped@example.com?fail=true").status_code == 400
    assert emails(clean_db) == ["kept@example.com"]


def test_a_failed_commit_is_an_error_not_a_success(test_client: TestClient, clean_db: Engine) -> None:
    assert test_client.post("/test/users/same@example.com").status_code == 200
    # The unique email is only checked at flush/commit: the client must not be told it worked.
    with pytest.raises(Exception, match="UNIQUE|unique"):
        test_client.post("/test/users/same@example.com")


def test_one_trip_work_has_the_same_rules_as_a_route(
    test_client: TestClient, clean_db: Engine, make_user: Callable[..., User],
    api_headers: Callable[[User], dict[str, str]],
) -> None:
    """``run_as_api_user``: 401 without a user, commit on success, rollback on error, a failed commit is an error."""
    headers = api_headers(make_user("owner@example.com"))
    refused = test_client.post("/test/one-trip/nobody@example.com")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    bad_token = test_client.post("/test/one-trip/nobody@example.com", headers={"Authorization": "Bearer nope"})
    assert bad_token.status_code == 401
    assert "The bearer token is invalid or revoked." in bad_token.text

    kept = test_client.post("/test/one-trip/kept@example.com", headers=headers)
    assert kept.json() == {"email": "kept@example.com", "by": "owner@example.com"}
    assert test_client.post("/test/one-trip/dropped@example.com?fail=true", headers=headers).status_code == 400
    assert sorted(emails(clean_db)) == ["kept@example.com", "owner@example.com"]
    with pytest.raises(Exception, match="UNIQUE|unique"):
        test_client.post("/test/one-trip/kept@example.com", headers=headers)
    assert sorted(emails(clean_db)) == ["kept@example.com", "owner@example.com"]


def test_who_is_asking(
    test_client: TestClient, make_user: Callable[..., User], login: Callable[..., TestClient],
    api_headers: Callable[[User], dict[str, str]],
) -> None:
    user = make_user("who@example.com")
    assert test_client.get("/test/optional").json() == {"email": None}
    assert test_client.get("/test/page", follow_redirects=False).headers["location"] == "/login?next=%2Ftest%2Fpage"
    assert test_client.get("/test/api").status_code == 401
    # A bearer token is for the API, not for pages.
    headers = api_headers(user)
    assert test_client.get("/test/api", headers=headers).json() == {"email": "who@example.com"}
    assert test_client.get("/test/page", headers=headers, follow_redirects=False).status_code == 303
    assert test_client.get("/test/optional", headers=headers).json() == {"email": None}

    login(test_client, user)
    assert test_client.get("/test/page").json() == {"email": "who@example.com"}
    assert test_client.get("/test/optional").json() == {"email": "who@example.com"}
    assert test_client.get("/test/api").json() == {"email": "who@example.com"}


def test_csrf_sources(
    test_client: TestClient, make_user: Callable[..., User], login: Callable[..., TestClient],
    csrf_token: Callable[[TestClient], str], api_headers: Callable[[User], dict[str, str]],
) -> None:
    user = make_user()
    login(test_client, user)
    token = csrf_token(test_client)
    assert test_client.post("/test/csrf").status_code == 403
    assert test_client.post("/test/csrf", headers={"X-CSRF-Token": "nope"}).status_code == 403
    assert test_client.post("/test/csrf", headers={"X-CSRF-Token": token}).status_code == 200
    assert test_client.post("/test/csrf", data={"csrf_token": token}).status_code == 200
    multipart = test_client.post("/test/csrf", files={"photo": ("a.jpg", b"x")}, data={"csrf_token": token})
    assert multipart.status_code == 200
    # Bearer requests are exempt: a browser never adds that header by itself.
    test_client.cookies.clear()
    assert test_client.post("/test/csrf", headers=api_headers(user)).status_code == 200


# The API's only routes that take a write from nobody: they are how one becomes somebody.
PUBLIC_API_WRITES = {("POST", "/api/v1/auth/signup"), ("POST", "/api/v1/auth/token")}


def api_writes(app: FastAPI) -> list[tuple[str, str]]:
    """Every POST, PUT, PATCH and DELETE route of the JSON API, with its ids filled in."""
    found = set()
    for route in iter_route_contexts(app.routes):
        if not route.path or not route.path.startswith("/api/"):
            continue
        for method in set(route.methods or ()) & {"POST", "PUT", "PATCH", "DELETE"}:
            if (method, route.path) not in PUBLIC_API_WRITES:
                path: str = route.path
                for placeholder in ("{subject_id:uuid}", "{image_id:uuid}", "{job_id:uuid}", "{token_id}",
                                    "{user_id:uuid}"):
                    path = path.replace(placeholder, str(uuid.uuid4()))
                assert "{" not in path, f"no value for a placeholder of {path}"
                found.add((method, path))
    return sorted(found)


@pytest.mark.parametrize("stale_cookie", [False, True])
def test_an_unauthenticated_api_write_is_401_not_a_csrf_refusal(
    settings: Settings, clean_db: Engine, stale_cookie: bool
) -> None:
    app = create_app(settings)
    writes = api_writes(app)
    assert len(writes) >= 6, writes
    with TestClient(app) as client:
        if stale_cookie:  # a signed-out browser still sends its old cookie
            client.cookies.set(SESSION_COOKIE, "no-longer-a-session")
        answers = {f"{method} {path}": client.request(method, path) for method, path in writes}
    wrong = {name: (answer.status_code, answer.text[:80]) for name, answer in answers.items()
             if answer.status_code != 401 or answer.headers.get("www-authenticate") != "Bearer"}
    assert not wrong, f"API writes that did not answer 401 to nobody: {wrong}"
    assert {answer.json()["detail"] for answer in answers.values()} == {"Not authenticated."}


def test_forms_are_parsed_with_the_studios_limits(test_client: TestClient) -> None:
    three = [("photos", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(3)]
    assert test_client.post("/test/form", files=three).json() == {"files": 3}
    four = [("photos", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(4)]
    response = test_client.post("/test/form", files=four)
    assert response.status_code == 400
    assert "Too many files" in response.text
    big_field = test_client.post("/test/form", data={"prompt": "x" * 70_000})
    assert big_field.status_code == 400


def test_parse_uuid() -> None:
    assert parse_uuid("not-a-uuid") is None
    assert str(parse_uuid("12345678-1234-5678-1234-567812345678")) == "12345678-1234-5678-1234-567812345678"


class ObservedHasher(PasswordHasher):
    """Cheap argon2 that counts the hashes running at once, and can be held until ``release`` is set."""

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.seconds = seconds
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.started = 0
        self.release = threading.Event()
        self.release.set()

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        with self.lock:
            self.running += 1
            self.started += 1
            self.peak = max(self.peak, self.running)
        try:
            self.release.wait(timeout=30)
            time.sleep(self.seconds)  # stands for argon2's real cost, so that hashes overlap when allowed to
            return super().hash(password, salt=salt)
        finally:
            with self.lock:
                self.running -= 1


def test_a_burst_of_sign_ups_hashes_at_most_the_slots_at_once(
    settings: Settings, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    hasher = ObservedHasher(seconds=0.1)
    monkeypatch.setattr(security, "password_hasher", hasher)
    app = create_app(settings.model_copy(update={"password_hash_slots": 2, "password_hash_wait_seconds": 60,
                                                 "max_signups_per_hour": 0}))
    with serving(app) as url:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=60) as client:
                answers = await asyncio.gather(*(
                    client.post(f"{url}/api/v1/auth/signup", json={"email": f"b{n}@example.com", "password": "x" * 12})
                    for n in range(8)
                ))
            return [answer.status_code for answer in answers]

        assert asyncio.run(burst()) == [201] * 8
    assert hasher.started == 8 and hasher.peak == 2


def test_past_the_wait_a_password_request_gets_503_with_retry_after(
    settings: Settings, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    hasher = ObservedHasher()
    hasher.release.clear()
    monkeypatch.setattr(security, "password_hasher", hasher)
    app = create_app(settings.model_copy(update={"password_hash_slots": 1, "password_hash_wait_seconds": 0.3}))
    first: dict[str, Any] = {}
    with serving(app) as url:
        holder = threading.Thread(target=lambda: first.update(answer=httpx.post(
            f"{url}/api/v1/auth/signup", json={"email": "first@example.com", "password": "x" * 12}, timeout=60)))
        holder.start()
        deadline = time.monotonic() + 20
        while hasher.started == 0:
            assert time.monotonic() < deadline, "the first sign-up never started hashing"
            time.sleep(0.02)
        try:
            for path, body in [("/api/v1/auth/signup", {"email": "second@example.com", "password": "x" * 12}),
                               ("/api/v1/auth/token", {"email": "first@example.com", "password": "x" * 12})]:
                busy = httpx.post(f"{url}{path}", json=body, timeout=10)
                assert busy.status_code == 503, path
                assert busy.headers["retry-after"] == "5"
                assert busy.json()["detail"] == "The studio is busy checking other passwords. Try again in 5 seconds."
                assert busy.headers["x-content-type-options"] == "nosniff"
            # Requests that hash nothing are not held up.
            assert httpx.get(f"{url}/api/v1/me", timeout=10).status_code == 401
        finally:
            hasher.release.set()
            holder.join(timeout=30)
        assert first["answer"].status_code == 201
        # The slot came back.
        again = httpx.post(f"{url}/api/v1/auth/signup", json={"email": "third@example.com", "password": "x" * 12})
        assert again.status_code == 201
    assert sorted(emails(clean_db)) == ["first@example.com", "third@example.com"]
