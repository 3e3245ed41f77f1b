"""The accounts JSON API: sign up, token exchange, /me, token management, and how each authenticates."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.models import ApiToken, User
from app.security import hash_token
from tests.app.conftest import PASSWORD

MakeUser = Callable[..., User]
Login = Callable[..., TestClient]
Headers = Callable[[User], dict[str, str]]
CsrfToken = Callable[[TestClient], str]


def test_signup(client: TestClient, clean_db: Engine) -> None:
    response = client.post("/api/v1/auth/signup", json={"email": "Api@Example.com", "password": PASSWORD})
    assert response.status_code == 201
    body = response.json()
    assert body["email"] == "api@example.com"
    assert set(body) == {"id", "email", "created_at", "email_verified_at", "notify_by_email"}
    with Session(clean_db) as session:
        assert session.scalars(select(User.id)).one() == uuid.UUID(body["id"])


def test_signup_errors(client: TestClient, make_user: MakeUser) -> None:
    make_user("taken@example.com")
    taken = client.post("/api/v1/auth/signup", json={"email": "taken@example.com", "password": PASSWORD})
    assert taken.status_code == 409
    assert taken.json() == {"detail": "An account with this email already exists. Log in instead?"}
    short = client.post("/api/v1/auth/signup", json={"email": "new@example.com", "password": "123456789"})
    assert short.status_code == 400
    assert "at least 10 characters" in short.json()["detail"]


def test_password_for_a_token_then_me(client: TestClient, make_user: MakeUser) -> None:
    user = make_user("script@example.com")
    response = client.post(
        "/api/v1/auth/token", json={"email": "script@example.com", "password": PASSWORD, "name": "backup job"}
    )
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "backup job" and body["token"].startswith("studio_")
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {body['token']}"})
    assert me.status_code == 200
    assert me.json()["id"] == str(user.id)


def test_wrong_password_for_a_token_is_401_and_rate_limited(client: TestClient, make_user: MakeUser) -> None:
    user = make_user()
    for _ in range(10):
        response = client.post("/api/v1/auth/token", json={"email": user.email, "password": "nope nope nope"})
        assert response.status_code == 401
        assert response.json() == {"detail": "The email or password is wrong."}
    limited = client.post("/api/v1/auth/token", json={"email": user.email, "password": PASSWORD})
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0


def test_me_needs_authentication(client: TestClient) -> None:
    anonymous = client.get("/api/v1/me")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.json() == {"detail": "Not authenticated."}
    forged = client.get("/api/v1/me", headers={"Authorization": "Bearer studio_forged"})
    assert forged.status_code == 401
    assert "invalid or revoked" in forged.json()["detail"]


def test_me_with_the_browser_session(client: TestClient, make_user: MakeUser, login: Login) -> None:
    user = make_user()
    login(client, user)
    assert client.get("/api/v1/me").json()["email"] == user.email


def test_a_bad_bearer_wins_over_a_good_cookie(client: TestClient, make_user: MakeUser, login: Login) -> None:
    login(client, make_user())
    assert client.get("/api/v1/me", headers={"Authorization": "Bearer studio_wrong"}).status_code == 401


def test_token_lifecycle_with_bearer(client: TestClient, make_user: MakeUser, api_headers: Headers,
                                     clean_db: Engine) -> None:
    user = make_user()
    headers = api_headers(user)
    created = client.post("/api/v1/tokens", json={"name": "ci"}, headers=headers)  # bearer: no CSRF needed
    assert created.status_code == 201
    new = created.json()

    listed = client.get("/api/v1/tokens", headers=headers).json()
    assert {token["name"] for token in listed} == {"ci", "test token"}
    assert all("token" not in token and "token_hash" not in token for token in listed)
    with Session(clean_db) as session:
        stored = session.get_one(ApiToken, uuid.UUID(new["id"]))
        assert stored.token_hash == hash_token(new["token"]) and new["token"] not in stored.token_hash

    new_headers = {"Authorization": f"Bearer {new['token']}"}
    assert client.get("/api/v1/me", headers=new_headers).status_code == 200
    assert client.delete(f"/api/v1/tokens/{new['id']}", headers=headers).status_code == 204
    assert client.get("/api/v1/me", headers=new_headers).status_code == 401
    assert [token["name"] for token in client.get("/api/v1/tokens", headers=headers).json()] == ["test token"]
    # Revoking twice, or an id that does not exist, is 404.
    assert client.delete(f"/api/v1/tokens/{new['id']}", headers=headers).status_code == 404
    assert client.delete(f"/api/v1/tokens/{uuid.uuid4()}", headers=headers).status_code == 404


def test_last_used_is_recorded(client: TestClient, make_user: MakeUser, api_headers: Headers) -> None:
    headers = api_headers(make_user())
    assert client.get("/api/v1/tokens", headers=headers).json()[0]["last_used_at"] is not None


def test_another_accounts_token_is_404(client: TestClient, make_user: MakeUser, api_headers: Headers,
                                       clean_db: Engine) -> None:
    owner_headers = api_headers(make_user("owner@example.com"))
    owner_token_id = client.get("/api/v1/tokens", headers=owner_headers).json()[0]["id"]
    intruder_headers = api_headers(make_user("intruder@example.com"))
    assert client.delete(f"/api/v1/tokens/{owner_token_id}", headers=intruder_headers).status_code == 404
    assert owner_token_id not in {t["id"] for t in client.get("/api/v1/tokens", headers=intruder_headers).json()}
    assert client.get("/api/v1/me", headers=owner_headers).status_code == 200


def test_cookie_authenticated_writes_need_csrf(client: TestClient, make_user: MakeUser, login: Login,
                                               csrf_token: CsrfToken) -> None:
    login(client, make_user())
    assert client.post("/api/v1/tokens", json={"name": "x"}).status_code == 403
    token = csrf_token(client)
    created = client.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": token})
    assert created.status_code == 201
    token_id = created.json()["id"]
    assert client.delete(f"/api/v1/tokens/{token_id}").status_code == 403
    assert client.delete(f"/api/v1/tokens/{token_id}", headers={"X-CSRF-Token": token}).status_code == 204


def test_token_name_is_required(client: TestClient, make_user: MakeUser, api_headers: Headers) -> None:
    response = client.post("/api/v1/tokens", json={"name": " "}, headers=api_headers(make_user()))
    assert response.status_code == 400
    assert "name" in response.json()["detail"]


def test_sign_out_everywhere_revokes_every_token_and_session(
    client: TestClient, make_user: MakeUser, login: Login, api_headers: Headers
) -> None:
    user = make_user()
    headers, script_headers = api_headers(user), api_headers(user)
    bystander_headers = api_headers(make_user())
    with TestClient(client.app, base_url="http://testserver") as browser:
        login(browser, user)
        answer = client.post("/api/v1/auth/sign-out-everywhere", headers=headers)
        assert answer.status_code == 200
        assert answer.json() == {"sessions_ended": 1, "tokens_revoked": 2}
        assert browser.get("/api/v1/me").status_code == 401
    for revoked in (headers, script_headers):
        assert client.get("/api/v1/me", headers=revoked).status_code == 401
    assert client.get("/api/v1/me", headers=bystander_headers).status_code == 200


def test_sign_out_everywhere_from_the_browser_needs_csrf(
    client: TestClient, make_user: MakeUser, login: Login, csrf_token: CsrfToken
) -> None:
    login(client, make_user())
    assert client.post("/api/v1/auth/sign-out-everywhere").status_code == 403
    answer = client.post("/api/v1/auth/sign-out-everywhere", headers={"X-CSRF-Token": csrf_token(client)})
    assert answer.json() == {"sessions_ended": 1, "tokens_revoked": 0}
    assert client.get("/api/v1/me").status_code == 401
