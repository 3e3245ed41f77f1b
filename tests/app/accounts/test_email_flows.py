"""Confirming the address and resetting a password, with every message going through a real SMTP
server on loopback (tests/mailbox.py): the links arrive, work once and expire, and asking for a reset
says nothing about who has an account."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app.accounts import email_flows, throttle
from app.config import Settings
from app.models import OutgoingEmail, PasswordReset, User, utcnow
from tests.app.conftest import PASSWORD, page_context
from tests.mailbox import Mailbox, html_of, link_in, text_of

MakeUser = Callable[..., User]
Headers = Callable[[User], dict[str, str]]
NEW_PASSWORD = "a brand new passphrase"


def token_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["token"][0]


def test_sign_up_sends_a_confirmation_link_that_works_once(client: TestClient, mailbox: Mailbox, db: Session,
                                                           settings: Settings) -> None:
    created = client.post("/api/v1/auth/signup", json={"email": "Ann@Example.com", "password": PASSWORD})
    assert created.status_code == 201 and created.json()["email_verified_at"] is None
    assert mailbox.messages == []  # nothing leaves inside the request: the cpu task sends it

    [message] = mailbox.wait_for(1)
    assert message["To"] == "ann@example.com" and message["From"] == "Studio <studio@example.org>"
    assert message["Subject"] == "Confirm your email address"
    link = link_in(message, "/verify-email?token=")
    assert link.startswith(settings.base_url + "/verify-email?token=")
    html = html_of(message)
    assert f'href="{link.replace("&", "&amp;")}"' in html and "<img" not in html  # no pictures, no pixels
    assert db.scalar(select(func.count()).select_from(OutgoingEmail)) == 0  # a sent message leaves no row

    first = client.get(link.removeprefix(settings.base_url), follow_redirects=False)
    assert first.status_code == 303
    user = db.scalars(select(User).where(User.email == "ann@example.com")).one()
    db.refresh(user)
    assert user.email_verified_at is not None
    again = client.post("/api/v1/auth/verify-email", json={"token": token_of(link)})
    assert again.status_code == 400 and "already used" in again.json()["detail"]
    forged = client.post("/api/v1/auth/verify-email", json={"token": token_of(link)[:-2] + "xx"})
    assert forged.status_code == 400 and "not valid" in forged.json()["detail"]


def test_a_confirmation_link_expires(db: Session, make_user: MakeUser, settings: Settings) -> None:
    user = make_user("late@example.com")
    issued = utcnow() - timedelta(hours=settings.email_verification_hours, minutes=1)
    token = email_flows.verification_token(settings, user, now=issued)
    with pytest.raises(email_flows.LinkError, match="expired"):
        email_flows.verify_email(db, settings, token)
    fresh = email_flows.verification_token(settings, user, now=issued + timedelta(minutes=2))
    assert email_flows.verify_email(db, settings, fresh).email_verified_at is not None


def test_a_confirmation_link_for_an_old_address_is_refused(db: Session, make_user: MakeUser,
                                                           settings: Settings) -> None:
    user = make_user("old@example.com")
    token = email_flows.verification_token(settings, user)
    owner = db.get(User, user.id)
    assert owner is not None
    owner.email = "new@example.com"
    db.flush()
    with pytest.raises(email_flows.LinkError, match="not valid"):
        email_flows.verify_email(db, settings, token)


def test_a_password_reset_answers_the_same_for_any_address_and_its_link_works_once(
        client: TestClient, mailbox: Mailbox, make_user: MakeUser, api_headers: Headers, db: Session,
        settings: Settings) -> None:
    user = make_user("bob@example.com")
    headers = api_headers(user)
    client.post("/login", data={"email": user.email, "password": PASSWORD,
                                "csrf_token": page_context(client.get("/login"))["csrf_token"]})
    assert client.get("/account").status_code == 200

    known = client.post("/api/v1/auth/password/forgot", json={"email": "Bob@Example.com"})
    unknown = client.post("/api/v1/auth/password/forgot", json={"email": "nobody@example.com"})
    assert known.status_code == unknown.status_code == 202
    assert known.json() == unknown.json() == {"detail": email_flows.RESET_REQUESTED_MESSAGE}
    [message] = mailbox.wait_for(1)
    assert message["To"] == "bob@example.com"
    link = link_in(message, "/password/reset?token=")
    token = token_of(link)
    stored = db.scalars(select(PasswordReset.token_hash)).one()
    assert token not in stored and len(stored) == 64  # only the hash is kept

    form = client.get(link.removeprefix(settings.base_url))
    assert form.status_code == 200 and page_context(form)["usable"] is True
    weak = client.post("/api/v1/auth/password/reset", json={"token": token, "password": "short"})
    assert weak.status_code == 400 and "at least 10" in weak.json()["detail"]  # the link still works after this
    done = client.post("/api/v1/auth/password/reset", json={"token": token, "password": NEW_PASSWORD})
    assert done.status_code == 200, done.text
    assert done.json()["sessions_ended"] == 1 and done.json()["tokens_revoked"] == 1
    # Every session and token of the account ended; the new password works, the old one does not.
    assert client.get("/api/v1/me", headers=headers).status_code == 401
    assert client.get("/account", follow_redirects=False).status_code == 303
    assert client.post("/api/v1/auth/token", json={"email": user.email, "password": NEW_PASSWORD}).status_code == 201
    assert client.post("/api/v1/auth/token", json={"email": user.email, "password": PASSWORD}).status_code == 401
    reused = client.post("/api/v1/auth/password/reset", json={"token": token, "password": "yet another passphrase"})
    assert reused.status_code == 400 and "already used" in reused.json()["detail"]
    changed = mailbox.wait_for(2)[1]
    assert changed["Subject"] == "Your password was reset" and "/password/forgot" in text_of(changed)
    assert len(mailbox.messages) == 2  # nothing was ever sent to the unknown address


def test_a_reset_link_expires(client: TestClient, db: Session, make_user: MakeUser, settings: Settings,
                              mailbox: Mailbox) -> None:
    make_user("slow@example.com")
    asked = utcnow() - timedelta(minutes=settings.password_reset_minutes + 1)
    email_flows.request_password_reset(db, settings, "slow@example.com", now=asked)
    db.commit()
    token = token_of(link_in(mailbox.wait_for(1)[0], "/password/reset"))
    expired = client.post("/api/v1/auth/password/reset", json={"token": token, "password": NEW_PASSWORD})
    assert expired.status_code == 400 and "expired" in expired.json()["detail"]
    page = client.get(f"/password/reset?token={token}")
    assert page.status_code == 400 and "expired" in page.text
    # A day after it expired, the hourly retention pass forgets the link altogether.
    assert email_flows.forget_old_reset_links(db, now=utcnow() + timedelta(days=1)) == 1


def test_reset_requests_are_limited_alike_for_known_and_unknown_addresses(
        client: TestClient, mailbox: Mailbox, make_user: MakeUser, monkeypatch: pytest.MonkeyPatch) -> None:
    make_user("carl@example.com")
    # The per-email limit alone (the test client's one address would reach its own limit first).
    monkeypatch.setattr(throttle, "RESET_CLIENT", replace(throttle.RESET_CLIENT, max_events=100))
    for email in ("carl@example.com", "ghost@example.com"):
        answers = [client.post("/api/v1/auth/password/forgot", json={"email": email}) for _ in range(4)]
        assert [answer.status_code for answer in answers] == [202, 202, 202, 429]
        assert "Retry-After" in answers[-1].headers
    assert len(mailbox.wait_for(3)) == 3 and {message["To"] for message in mailbox.messages} == {"carl@example.com"}
    monkeypatch.undo()
    limited = client.post("/api/v1/auth/password/forgot", json={"email": "someone.else@example.com"})
    assert limited.status_code == 429  # and one address may ask 5 times an hour, whatever the emails


def test_the_forgot_password_page_answers_the_same_for_any_address(client: TestClient, csrf_token: Callable[..., str],
                                                                  make_user: MakeUser, mailbox: Mailbox) -> None:
    make_user("dora@example.com")
    pages = [client.post("/password/forgot", data={"email": email, "csrf_token": csrf_token(client)})
             for email in ("dora@example.com", "nobody@example.com")]
    assert [page.status_code for page in pages] == [200, 200]
    assert page_context(pages[0])["message"] == page_context(pages[1])["message"] == email_flows.RESET_REQUESTED_MESSAGE
    assert [message["To"] for message in mailbox.wait_for(1)] == ["dora@example.com"]


def test_training_can_require_a_confirmed_address(client: TestClient, make_user: MakeUser, api_headers: Headers,
                                                  settings: Settings, clean_db: Engine) -> None:
    settings.require_verified_email = True
    user = make_user("eve@example.com")
    headers = api_headers(user)
    refused = client.post("/api/v1/subjects", headers=headers, files={"name": (None, "Rex")})
    assert refused.status_code == 403 and "Confirm your email address" in refused.json()["detail"]
    with Session(clean_db) as session:
        owner = session.get(User, user.id)
        assert owner is not None
        email_flows.verify_email(session, settings, email_flows.verification_token(settings, owner))
        session.commit()
    allowed = client.post("/api/v1/subjects", headers=headers, files={"name": (None, "Rex")})
    assert allowed.status_code == 422  # past the gate: now it is the missing photos and fields


def test_a_new_confirmation_link_can_be_asked_for_three_times_an_hour(
        client: TestClient, make_user: MakeUser, login: Callable[..., TestClient],
        csrf_token: Callable[[TestClient], str], mailbox: Mailbox) -> None:
    login(client, make_user("fay@example.com"))
    flashes = [page_context(client.post("/account/verify/resend", data={"csrf_token": csrf_token(client)}))["flash"]
               for _ in range(4)]
    assert [flash.kind for flash in flashes] == ["success", "success", "success", "warning"]
    messages = mailbox.wait_for(3)
    assert all(link_in(message, "/verify-email?token=") for message in messages)
    assert [message["To"] for message in mailbox.messages] == ["fay@example.com"] * 3  # the fourth was refused
