"""Account rules without HTTP: sign up, authenticate, sessions and tokens."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher
from sqlalchemy.orm import Session

from app import security
from app.accounts import service
from app.config import Settings
from app.models import utcnow


def test_sign_up_normalizes_and_hashes(db_session: Session) -> None:
    user = service.sign_up(db_session, " Ann@Example.COM", "a long password")
    assert user.email == "ann@example.com"
    assert security.verify_password(user.password_hash, "a long password")
    assert not security.verify_password(user.password_hash, "another password")


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [
        ("ann@example.com", "123456789", "password"),
        ("ann@example.com", "x" * 1025, "password"),
        ("ann", "a long password", "email"),
        ("ann@localhost", "a long password", "email"),
        ("a b@example.com", "a long password", "email"),
        ("x" * 320 + "@example.com", "a long password", "email"),
    ],
)
def test_sign_up_rules(db_session: Session, email: str, password: str, field: str) -> None:
    with pytest.raises(service.AccountError) as raised:
        service.sign_up(db_session, email, password)
    assert raised.value.field == field


def test_email_taken_ignores_case(db_session: Session) -> None:
    service.sign_up(db_session, "ann@example.com", "a long password")
    with pytest.raises(service.EmailTaken):
        service.sign_up(db_session, "ANN@example.com", "another long password")


def test_authenticate(db_session: Session) -> None:
    user = service.sign_up(db_session, "ann@example.com", "a long password")
    assert service.authenticate(db_session, "ANN@example.com ", "a long password") is user
    assert service.authenticate(db_session, "ann@example.com", "a wrong password") is None
    assert service.authenticate(db_session, "bob@example.com", "a long password") is None
    assert service.authenticate(db_session, "ann@example.com", "x" * 5000) is None
    user.is_active = False
    assert service.authenticate(db_session, "ann@example.com", "a long password") is None


def test_authenticate_upgrades_weak_hashes(db_session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    user = service.sign_up(db_session, "ann@example.com", "a long password")
    old_hash = user.password_hash
    monkeypatch.setattr(security, "password_hasher", PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))
    assert service.authenticate(db_session, "ann@example.com", "a long password") is user
    assert user.password_hash != old_hash and "t=2" in user.password_hash


def test_sessions_expire_after_the_configured_days(db_session: Session, settings: Settings) -> None:
    user = service.sign_up(db_session, "ann@example.com", "a long password")
    started = service.start_session(db_session, user, settings.model_copy(update={"session_days": 3}))
    lifetime = started.user_session.expires_at - utcnow()
    assert 2.9 < lifetime.total_seconds() / 86400 <= 3
    assert started.user_session.token_hash == security.hash_token(started.token)
    assert started.user_session.csrf_token and started.user_session.csrf_token != started.token
    service.end_session(db_session, started.user_session)
    assert started.user_session.revoked_at is not None


def test_tokens_are_named_and_owner_scoped(db_session: Session) -> None:
    ann = service.sign_up(db_session, "ann@example.com", "a long password")
    bob = service.sign_up(db_session, "bob@example.com", "a long password")
    created = service.create_api_token(db_session, ann, "  laptop  ")
    assert created.api_token.name == "laptop"
    with pytest.raises(service.AccountError, match="name"):
        service.create_api_token(db_session, ann, "")
    with pytest.raises(service.AccountError, match="under 100"):
        service.create_api_token(db_session, ann, "x" * 101)
    assert not service.revoke_api_token(db_session, bob, created.api_token.id)
    assert service.revoke_api_token(db_session, ann, created.api_token.id)
    assert not service.revoke_api_token(db_session, ann, created.api_token.id)


def test_change_password_keeps_only_the_given_session(db_session: Session, settings: Settings) -> None:
    user = service.sign_up(db_session, "ann@example.com", "a long password")
    here = service.start_session(db_session, user, settings).user_session
    elsewhere = service.start_session(db_session, user, settings).user_session
    with pytest.raises(service.AccountError) as wrong:
        service.change_password(db_session, user, "not the password", "another long password", keep=here)
    assert wrong.value.field == "current_password" and elsewhere.revoked_at is None
    assert service.change_password(db_session, user, "a long password", "another long password", keep=here) == 1
    assert elsewhere.revoked_at is not None and here.revoked_at is None
    assert service.authenticate(db_session, "ann@example.com", "another long password") is user
