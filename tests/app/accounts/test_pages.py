"""Sign up, log in, log out and the account page, through the browser forms."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.main import create_app
from app.models import ApiToken, User, UserSession, utcnow
from app.security import ANONYMOUS_CSRF_COOKIE, SESSION_COOKIE, hash_token
from tests.app.conftest import PASSWORD, page_context, page_template

MakeUser = Callable[..., User]
Login = Callable[..., TestClient]
CsrfToken = Callable[[TestClient], str]
Headers = Callable[[User], dict[str, str]]


def sign_up(client: TestClient, email: str, password: str = PASSWORD, **extra: str) -> object:
    token = page_context(client.get("/signup"))["csrf_token"]
    data = {"email": email, "password": password, "csrf_token": token, **extra}
    return client.post("/signup", data=data, follow_redirects=False)


def test_sign_up_creates_the_account_and_signs_in(client: TestClient, clean_db: Engine) -> None:
    response = sign_up(client, "  Ann@Example.COM ")
    assert response.status_code == 303  # type: ignore[attr-defined]
    assert response.headers["location"] == "/studios"  # type: ignore[attr-defined]
    cookie_header = response.headers["set-cookie"].lower()  # type: ignore[attr-defined]
    assert f"{SESSION_COOKIE}=" in cookie_header and "httponly" in cookie_header and "samesite=lax" in cookie_header

    with Session(clean_db) as session:
        user = session.scalars(select(User)).one()
        assert user.email == "ann@example.com"
        assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
        stored = session.scalars(select(UserSession)).one()
        raw = client.cookies[SESSION_COOKIE]
        assert stored.token_hash == hash_token(raw) and raw not in stored.token_hash

    account = client.get("/account")
    assert page_template(account) == "accounts/account.html"
    assert "<title>Account · Photo Studio</title>" in account.text
    assert account.text.count('id="export-title"') == 1  # each section once, in the page's body
    assert page_context(account)["user"].email == "ann@example.com"
    assert page_context(account)["flash"].message.startswith("Welcome to the studio! We sent a link to ")
    assert page_context(client.get("/account"))["flash"] is None  # shown once


def test_sign_up_with_a_taken_email_says_so(client: TestClient, make_user: MakeUser) -> None:
    make_user("taken@example.com")
    response = sign_up(client, "TAKEN@example.com")
    assert response.status_code == 409  # type: ignore[attr-defined]
    context = page_context(response)
    assert context["errors"] == ["An account with this email already exists. Log in instead?"]
    assert context["email"] == "TAKEN@example.com"
    assert SESSION_COOKIE not in client.cookies


@pytest.mark.parametrize(
    ("email", "password", "message"),
    [
        ("ann@example.com", "short", "at least 10 characters"),
        ("not-an-email", PASSWORD, "valid email"),
        ("", PASSWORD, "Enter your email"),
    ],
)
def test_sign_up_refuses_bad_input(client: TestClient, clean_db: Engine, email: str, password: str,
                                   message: str) -> None:
    response = sign_up(client, email, password)
    assert response.status_code == 400  # type: ignore[attr-defined]
    assert message in page_context(response)["errors"][0]
    with Session(clean_db) as session:
        assert session.scalars(select(User)).first() is None


def test_log_in_and_land_on_next(client: TestClient, make_user: MakeUser) -> None:
    user = make_user("bob@example.com")
    page = client.get("/login?next=/account")
    assert page_context(page)["next"] == "/account"
    response = client.post(
        "/login",
        data={"email": "Bob@Example.com", "password": PASSWORD, "next": "/account",
              "csrf_token": page_context(page)["csrf_token"]},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/account"
    assert page_context(client.get("/account"))["user"].id == user.id


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example", "/\\evil.example", "javascript:alert(1)"]
)
def test_next_never_leaves_the_site(client: TestClient, make_user: MakeUser, target: str) -> None:
    user = make_user()
    page = client.get("/login", params={"next": target})
    assert page_context(page)["next"] == ""
    response = client.post(
        "/login",
        data={"email": user.email, "password": PASSWORD, "next": target,
              "csrf_token": page_context(page)["csrf_token"]},
        follow_redirects=False,
    )
    assert response.headers["location"] == "/studios"


@pytest.mark.parametrize("email", ["bob@example.com", "nobody@example.com"])
def test_wrong_login_gives_one_message(client: TestClient, make_user: MakeUser, email: str) -> None:
    make_user("bob@example.com")
    page = client.get("/login")
    response = client.post(
        "/login", data={"email": email, "password": "wrong password!", "csrf_token": page_context(page)["csrf_token"]}
    )
    assert response.status_code == 400
    assert page_context(response)["errors"] == ["The email or password is wrong."]
    assert SESSION_COOKIE not in client.cookies


def test_deactivated_account_cannot_log_in(client: TestClient, make_user: MakeUser, clean_db: Engine) -> None:
    user = make_user()
    with Session(clean_db) as session:
        session.get_one(User, user.id).is_active = False
        session.commit()
    page = client.get("/login")
    response = client.post(
        "/login", data={"email": user.email, "password": PASSWORD, "csrf_token": page_context(page)["csrf_token"]}
    )
    assert response.status_code == 400


def test_too_many_failed_logins_are_refused_with_retry_after(client: TestClient, make_user: MakeUser) -> None:
    user = make_user()
    token = page_context(client.get("/login"))["csrf_token"]
    for _ in range(10):
        failed = client.post("/login", data={"email": user.email, "password": "x" * 12, "csrf_token": token})
        assert failed.status_code == 400
    response = client.post("/login", data={"email": user.email, "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    assert "Too many failed attempts" in page_context(response)["errors"][0]


def test_logout_revokes_the_session_on_the_server(
    client: TestClient, make_user: MakeUser, login: Login, csrf_token: CsrfToken, clean_db: Engine
) -> None:
    login(client, make_user())
    old_cookie = client.cookies[SESSION_COOKIE]
    response = client.post("/logout", data={"csrf_token": csrf_token(client)}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert SESSION_COOKIE not in client.cookies

    with Session(clean_db) as session:
        assert session.scalars(select(UserSession)).one().revoked_at is not None
    # Replaying the old cookie (say, copied before logout) no longer works.
    client.cookies.set(SESSION_COOKIE, old_cookie)
    assert client.get("/account", follow_redirects=False).status_code == 303
    assert page_context(client.get("/"))["user"] is None


def test_expired_session_is_signed_out(client: TestClient, make_user: MakeUser, login: Login,
                                       clean_db: Engine) -> None:
    login(client, make_user())
    with Session(clean_db) as session:
        session.scalars(select(UserSession)).one().expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
    assert client.get("/account", follow_redirects=False).status_code == 303


def test_session_cookie_is_secure_when_configured(settings, clean_db: Engine, make_user: MakeUser) -> None:  # type: ignore[no-untyped-def]
    from app.main import create_app

    secure = settings.model_copy(update={"cookie_secure": True})
    user = make_user()
    with TestClient(create_app(secure), base_url="https://testserver") as client:
        page = client.get("/login")
        response = client.post(
            "/login", data={"email": user.email, "password": PASSWORD, "csrf_token": page_context(page)["csrf_token"]},
            follow_redirects=False,
        )
    assert "secure" in response.headers["set-cookie"].lower()


def _post_targets(client: TestClient, make_user: MakeUser, login: Login, clean_db: Engine) -> dict[str, dict[str, str]]:
    """Every form post of the accounts pages, with valid data apart from the CSRF token."""
    user = make_user("forms@example.com")
    login(client, user)
    with Session(clean_db) as session:
        token = ApiToken(user_id=user.id, name="t", token_hash=hash_token("whatever"))
        session.add(token)
        session.commit()
        token_id = token.id
    return {
        "/signup": {"email": "new@example.com", "password": PASSWORD},
        "/login": {"email": user.email, "password": PASSWORD},
        "/logout": {},
        "/account/tokens": {"name": "script"},
        f"/account/tokens/{token_id}/revoke": {},
        "/account/password": {"current_password": PASSWORD, "new_password": "a brand new password"},
        "/account/sessions/end-others": {},
        "/account/sign-out-everywhere": {},
    }


@pytest.mark.parametrize("bad_token", [None, "", "wrong-token"])
def test_every_form_post_needs_the_csrf_token(
    client: TestClient, make_user: MakeUser, login: Login, clean_db: Engine, bad_token: str | None
) -> None:
    targets = _post_targets(client, make_user, login, clean_db)
    for path, data in targets.items():
        form = dict(data)
        if bad_token is not None:
            form["csrf_token"] = bad_token
        response = client.post(path, data=form, follow_redirects=False)
        assert response.status_code == 403, path
        assert page_template(response) == "error.html"
    # Nothing happened: still signed in, no new account, no token created or revoked.
    assert page_context(client.get("/account"))["user"].email == "forms@example.com"
    with Session(clean_db) as session:
        assert session.scalars(select(User.email)).all() == ["forms@example.com"]
        assert [t.revoked_at for t in session.scalars(select(ApiToken))] == [None]


def test_visitor_forms_use_a_cookie_token_that_login_replaces(client: TestClient, make_user: MakeUser) -> None:
    page = client.get("/login")
    visitor_token = page_context(page)["csrf_token"]
    assert client.cookies[ANONYMOUS_CSRF_COOKIE] == visitor_token
    # Another visitor's token (from a different browser) does not pass for this one.
    response = client.post("/login", data={"email": "a@example.com", "password": PASSWORD, "csrf_token": "x" * 32})
    assert response.status_code == 403

    user = make_user()
    client.post("/login", data={"email": user.email, "password": PASSWORD, "csrf_token": visitor_token},
                follow_redirects=False)
    assert ANONYMOUS_CSRF_COOKIE not in client.cookies
    assert page_context(client.get("/account"))["csrf_token"] != visitor_token


def test_signed_in_people_skip_the_login_and_signup_pages(client: TestClient, make_user: MakeUser,
                                                          login: Login) -> None:
    login(client, make_user())
    assert client.get("/login", follow_redirects=False).headers["location"] == "/studios"
    assert client.get("/signup?next=/account", follow_redirects=False).headers["location"] == "/account"


def test_api_tokens_on_the_account_page(
    client: TestClient, make_user: MakeUser, login: Login, csrf_token: CsrfToken, clean_db: Engine
) -> None:
    login(client, make_user())
    created = client.post("/account/tokens", data={"name": "laptop script", "csrf_token": csrf_token(client)})
    assert created.status_code == 201
    new_token = page_context(created)["new_token"]
    raw = new_token.token
    assert raw.startswith("studio_") and raw in created.text
    assert [t.name for t in page_context(created)["tokens"]] == ["laptop script"]

    # Shown once: the account page afterwards lists the token but never shows it again.
    account = client.get("/account")
    assert page_context(account)["new_token"] is None and raw not in account.text
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"}).status_code == 200

    token_id = new_token.api_token.id
    revoked = client.post(f"/account/tokens/{token_id}/revoke", data={"csrf_token": csrf_token(client)})
    assert revoked.status_code == 200 and page_template(revoked) == "accounts/account.html"
    assert page_context(revoked)["tokens"] == []
    assert "revoked" in page_context(revoked)["flash"].message
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"}).status_code == 401


def test_token_needs_a_name(client: TestClient, make_user: MakeUser, login: Login, csrf_token: CsrfToken) -> None:
    login(client, make_user())
    response = client.post("/account/tokens", data={"name": "   ", "csrf_token": csrf_token(client)})
    assert response.status_code == 400
    assert "name" in page_context(response)["errors"][0]
    assert page_context(response)["tokens"] == []


def test_revoking_another_accounts_token_is_404(
    client: TestClient, make_user: MakeUser, login: Login, csrf_token: CsrfToken, clean_db: Engine
) -> None:
    owner = make_user("owner@example.com")
    with Session(clean_db) as session:
        token = ApiToken(user_id=owner.id, name="theirs", token_hash=hash_token("theirs"))
        session.add(token)
        session.commit()
        token_id = token.id
    login(client, make_user("intruder@example.com"))
    response = client.post(f"/account/tokens/{token_id}/revoke", data={"csrf_token": csrf_token(client)})
    assert response.status_code == 404
    with Session(clean_db) as session:
        assert session.get_one(ApiToken, token_id).revoked_at is None


def second_browser(client: TestClient) -> TestClient:
    return TestClient(client.app, base_url="http://testserver")


def test_change_password_signs_out_other_devices(
    client: TestClient, make_user: MakeUser, login: Login, csrf_token: CsrfToken, clean_db: Engine
) -> None:
    user = make_user()
    with second_browser(client) as laptop:
        login(laptop, user)
        login(client, user)
        assert page_context(client.get("/account"))["other_sessions"] == 1

        response = client.post(
            "/account/password",
            data={"current_password": PASSWORD, "new_password": "a brand new password",
                  "csrf_token": csrf_token(client)},
        )
        assert page_context(response)["flash"].message == "Your password is changed. 1 other device signed out."
        assert page_context(response)["other_sessions"] == 0
        assert laptop.get("/account", follow_redirects=False).status_code == 303  # the other device is out
        assert client.get("/account", follow_redirects=False).status_code == 200  # this one stays in

    client.post("/logout", data={"csrf_token": csrf_token(client)})
    token = csrf_token(client)
    old = client.post("/login", data={"email": user.email, "password": PASSWORD, "csrf_token": token})
    assert old.status_code == 400
    new = client.post("/login", data={"email": user.email, "password": "a brand new password", "csrf_token": token},
                      follow_redirects=False)
    assert new.status_code == 303


@pytest.mark.parametrize(
    ("current", "new", "field", "message"),
    [
        ("not my password", "a brand new password", "current_password", "current password is wrong"),
        (PASSWORD, "short", "new_password", "at least 10 characters"),
        (PASSWORD, PASSWORD, "new_password", "different from the current one"),
    ],
)
def test_change_password_refusals(client: TestClient, make_user: MakeUser, login: Login, csrf_token: CsrfToken,
                                  current: str, new: str, field: str, message: str) -> None:
    user = make_user()
    login(client, user)
    response = client.post(
        "/account/password", data={"current_password": current, "new_password": new, "csrf_token": csrf_token(client)}
    )
    assert response.status_code == 400
    context = page_context(response)
    assert context["password_error_field"] == field and message in context["password_errors"][0]
    client.post("/logout", data={"csrf_token": csrf_token(client)})
    login(client, user)  # the old password still works


def test_guessing_the_current_password_is_rate_limited(client: TestClient, make_user: MakeUser, login: Login,
                                                        csrf_token: CsrfToken) -> None:
    login(client, make_user())
    token = csrf_token(client)
    for _ in range(10):
        wrong = {"current_password": "a wrong guess!", "new_password": "a brand new password", "csrf_token": token}
        assert client.post("/account/password", data=wrong).status_code == 400
    right = {"current_password": PASSWORD, "new_password": "a brand new password", "csrf_token": token}
    response = client.post("/account/password", data=right)
    assert response.status_code == 429
    assert "Too many wrong attempts" in page_context(response)["password_errors"][0]


def test_sign_out_other_devices(client: TestClient, make_user: MakeUser, login: Login, csrf_token: CsrfToken) -> None:
    user = make_user()
    with second_browser(client) as phone, second_browser(client) as tablet:
        login(phone, user)
        login(tablet, user)
        login(client, user)
        response = client.post("/account/sessions/end-others", data={"csrf_token": csrf_token(client)})
        assert page_context(response)["flash"].message == "Signed out 2 other devices."
        assert phone.get("/account", follow_redirects=False).status_code == 303
        assert tablet.get("/account", follow_redirects=False).status_code == 303
        again = client.post("/account/sessions/end-others", data={"csrf_token": csrf_token(client)})
        assert page_context(again)["flash"].message == "No other device was signed in."


def test_closed_sign_ups_say_so_and_create_nothing(settings: Settings, clean_db: Engine, make_user: MakeUser,
                                                   login: Login) -> None:
    closed = settings.model_copy(update={"signups_open": False})
    with TestClient(create_app(closed), base_url="http://testserver") as client:
        page = client.get("/signup")
        assert page.status_code == 200
        assert "Sign-ups are closed on this studio" in page.text
        assert 'action="/signup"' not in page.text  # no form to fill in for nothing
        refused = sign_up(client, "late@example.com")
        assert refused.status_code == 403  # type: ignore[attr-defined]
        assert "Sign-ups are closed" in refused.text  # type: ignore[attr-defined]
        api = client.post("/api/v1/auth/signup", json={"email": "api@example.com", "password": PASSWORD})
        assert api.status_code == 403
        assert api.json()["detail"].startswith("Sign-ups are closed")
        # Nowhere does the site invite a visitor to sign up; existing accounts still log in.
        for path in ("/", "/login"):
            assert 'href="/signup' not in client.get(path).text, path
        user = make_user("member@example.com")
        login(client, user)
        assert client.get("/studios").status_code == 200
    with Session(clean_db) as session:
        assert list(session.scalars(select(User.email))) == ["member@example.com"]


def test_open_sign_ups_are_offered(client: TestClient) -> None:
    for path in ("/", "/login"):
        assert 'href="/signup' in client.get(path).text, path


def test_a_password_change_keeps_api_tokens_and_says_so(
    client: TestClient, make_user: MakeUser, login: Login, csrf_token: CsrfToken, api_headers: Headers
) -> None:
    """Decided: tokens are credentials of their own (see service.change_password); the page says they still work."""
    user = make_user()
    headers = api_headers(user)
    login(client, user)
    response = client.post("/account/password", data={"current_password": PASSWORD,
                                                       "new_password": "a brand new password",
                                                       "csrf_token": csrf_token(client)})
    assert page_context(response)["flash"].message == (
        "Your password is changed. Your 1 API token still works: revoke any you do not recognise, or sign out "
        "everywhere.")
    assert client.get("/api/v1/me", headers=headers).status_code == 200


def test_sign_out_everywhere_ends_every_session_and_every_token(
    client: TestClient, make_user: MakeUser, login: Login, csrf_token: CsrfToken, api_headers: Headers
) -> None:
    user, bystander = make_user(), make_user()
    headers, other_headers = api_headers(user), api_headers(bystander)
    with second_browser(client) as phone, second_browser(client) as bystanders_browser:
        login(phone, user)
        login(bystanders_browser, bystander)
        login(client, user)
        # A token made with the session, as someone holding a stolen cookie could.
        made = client.post("/account/tokens", data={"name": "made here", "csrf_token": csrf_token(client)})
        made_headers = {"Authorization": f"Bearer {page_context(made)['new_token'].token}"}
        assert client.get("/api/v1/me", headers=made_headers).status_code == 200
        assert "Sign out everywhere" in client.get("/account").text

        response = client.post("/account/sign-out-everywhere", data={"csrf_token": csrf_token(client)},
                               follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login"
        assert f'{SESSION_COOKIE}=""' in response.headers["set-cookie"]
        landing = client.get("/login")
        assert page_context(landing)["flash"].message == (
            "Signed out everywhere: 2 sessions ended and 2 API tokens revoked.")
        for browser in (client, phone):
            assert browser.get("/account", follow_redirects=False).status_code == 303
        for token_headers in (headers, made_headers):
            assert client.get("/api/v1/me", headers=token_headers).status_code == 401
        # Nobody else's sessions or tokens.
        assert bystanders_browser.get("/account", follow_redirects=False).status_code == 200
        assert client.get("/api/v1/me", headers=other_headers).status_code == 200
    login(client, user)  # the password still works: this is not a lock-out
