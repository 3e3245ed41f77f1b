"""Account rules: sign up, sign in, browser sessions, API tokens. Services flush; the caller commits."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import rate_limits
from app.accounts import repository
from app.config import Settings
from app.models import ApiToken, User, UserSession, utcnow
from app.security import (
    MAX_PASSWORD_LENGTH,
    MIN_PASSWORD_LENGTH,
    hash_password,
    hash_token,
    new_api_token,
    new_token,
    password_needs_rehash,
    verify_password,
)

LOGIN_FAILED_MESSAGE = "The email or password is wrong."
MAX_EMAIL_LENGTH = 320
MAX_TOKEN_NAME_LENGTH = 100
# Deliberately loose: one "@", something on each side, a dot in the domain. The inbox decides the rest.
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class AccountError(ValueError):
    """A sign-up or token request that breaks a rule; ``field`` names the form field at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class EmailTaken(AccountError):
    pass


class SignupsClosed(AccountError):
    pass


class TooManySignups(AccountError):
    """The address made as many accounts as it may in the last hour."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "Too many accounts were created from your network in the last hour. "
            f"Try again in {rate_limits.wait_in_words(retry_after)}."
        )
        self.retry_after = retry_after


def check_signups_open(settings: Settings) -> None:
    """Raise :class:`SignupsClosed` when the operator closed sign-ups (``STUDIO_SIGNUPS_OPEN=false``)."""
    if not settings.signups_open:
        raise SignupsClosed("Sign-ups are closed on this studio. Ask the person who runs it for an account.")


def normalize_email(email: str) -> str:
    """Trimmed and lower-cased, so "Ann@Example.com " and "ann@example.com" are one account."""
    return email.strip().lower()


def validate_email(email: str) -> str:
    normalized = normalize_email(email)
    if not normalized:
        raise AccountError("Enter your email address.", field="email")
    if len(normalized) > MAX_EMAIL_LENGTH or not EMAIL_PATTERN.match(normalized):
        raise AccountError("Enter a valid email address, like name@example.com.", field="email")
    return normalized


def validate_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"Choose a password of at least {MIN_PASSWORD_LENGTH} characters.", field="password")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError(f"Choose a password of at most {MAX_PASSWORD_LENGTH} characters.", field="password")
    return password


def sign_up(session: Session, email: str, password: str) -> User:
    """Create an account; raises AccountError (bad email or password) or EmailTaken.

    Callers that answer the error themselves should roll the session back first.
    """
    normalized = validate_email(email)
    validate_password(password)
    taken = EmailTaken("An account with this email already exists. Log in instead?", field="email")
    if repository.user_by_email(session, normalized) is not None:
        raise taken
    user = User(email=normalized, password_hash=hash_password(password))
    session.add(user)
    try:
        session.flush()
    except IntegrityError as error:
        # Another sign-up with this email committed between the check and the flush. The session
        # must be rolled back by the caller (the request's transaction does it when this propagates).
        raise taken from error
    return user


def sign_up_counted(session: Session, email: str, password: str, counter: rate_limits.Counter | None) -> User:
    """:func:`sign_up`, counted on ``counter`` (the address's sign-ups) in the same transaction.

    Raises :class:`TooManySignups` when the counter is full, before any password is hashed; only
    an account actually created counts. Requests that pass the check at the same moment can each
    create one: the hash slots (``app.deps.password_hash_slot``) bound how many do.
    """
    if counter is not None:
        wait = rate_limits.retry_after(session, [counter])
        if wait is not None:
            raise TooManySignups(wait)
    user = sign_up(session, email, password)
    if counter is not None:
        rate_limits.record(session, [counter])
        session.flush()
    return user


# Verified against when the email is unknown, so a wrong email costs as much time as a wrong password.
_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(new_token(16))
    return _DUMMY_HASH


def authenticate(session: Session, email: str, password: str) -> User | None:
    """The active user with this email and password, or None (without saying which was wrong)."""
    user = repository.user_by_email(session, normalize_email(email))
    if user is None or len(password) > MAX_PASSWORD_LENGTH:
        verify_password(_dummy_hash(), password[:MAX_PASSWORD_LENGTH])
        return None
    if not verify_password(user.password_hash, password) or not user.is_active:
        return None
    if password_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
        session.flush()
    return user


def password_matches(user: User, password: str) -> bool:
    """True when ``password`` is ``user``'s (for actions that ask for it again, like deleting the account)."""
    return verify_password(user.password_hash, password[:MAX_PASSWORD_LENGTH])


@dataclass(frozen=True)
class NewSession:
    token: str
    """The raw cookie value: only its hash is stored."""
    user_session: UserSession


def start_session(session: Session, user: User, settings: Settings) -> NewSession:
    """A browser session of ``settings.session_days`` days with its own CSRF token."""
    raw = new_token(32)
    user_session = UserSession(
        user_id=user.id,
        token_hash=hash_token(raw),
        csrf_token=new_token(32),
        expires_at=utcnow() + timedelta(days=settings.session_days),
    )
    session.add(user_session)
    session.flush()
    return NewSession(token=raw, user_session=user_session)


def end_session(session: Session, user_session: UserSession) -> None:
    """Revoke a browser session: its cookie stops working at once, on every device that holds it."""
    if user_session.revoked_at is None:
        user_session.revoked_at = utcnow()
        session.flush()


def end_other_sessions(session: Session, user: User, keep: UserSession | None) -> int:
    """Revoke every live browser session of ``user`` except ``keep``; returns how many ended."""
    now = utcnow()
    ended = 0
    for other in repository.live_sessions(session, user.id):
        if keep is None or other.id != keep.id:
            other.revoked_at = now
            ended += 1
    session.flush()
    return ended


@dataclass(frozen=True)
class SignedOut:
    sessions: int
    tokens: int


def sign_out_everywhere(session: Session, user: User) -> SignedOut:
    """Revoke every live browser session of ``user`` (the caller's own too) and every API token.

    What someone does who suspects another person has been in the account: a stolen cookie, a
    token made with it, a token in a script that leaked all stop working at once.
    """
    sessions = end_other_sessions(session, user, keep=None)
    now = utcnow()
    tokens = repository.active_tokens(session, user.id)
    for api_token in tokens:
        api_token.revoked_at = now
    session.flush()
    return SignedOut(sessions=sessions, tokens=len(tokens))


def change_password(
    session: Session, user: User, current_password: str, new_password: str, keep: UserSession | None
) -> int:
    """Set a new password after checking the current one; signs out every other device.

    Raises AccountError (field "current_password" or "new_password"). Returns the number of other
    sessions ended: whoever else held a session (say, a stolen cookie) is out.

    API tokens keep working, on purpose: a token is a credential of its own that the person made
    for a script, named, and can see and revoke on the account page; it is not derived from the
    password, and a routine password change should not break every script. Someone who changes
    the password because another person may have been in the account (and may have made a token)
    uses :func:`sign_out_everywhere`, which the page offers right there.
    """
    if not verify_password(user.password_hash, current_password[:MAX_PASSWORD_LENGTH]):
        raise AccountError("The current password is wrong.", field="current_password")
    try:
        validate_password(new_password)
    except AccountError as error:
        raise AccountError(error.message, field="new_password") from error
    if new_password == current_password:
        raise AccountError("Choose a password different from the current one.", field="new_password")
    user.password_hash = hash_password(new_password)
    session.flush()
    return end_other_sessions(session, user, keep)


@dataclass(frozen=True)
class NewApiToken:
    token: str
    """The raw bearer token: shown once, only its hash is stored."""
    api_token: ApiToken


def create_api_token(session: Session, user: User, name: str) -> NewApiToken:
    """A new bearer token for ``user``; ``name`` (a label like "laptop script") is required."""
    label = name.strip()
    if not label:
        raise AccountError("Give the token a name, so you can recognise it later.", field="name")
    if len(label) > MAX_TOKEN_NAME_LENGTH:
        raise AccountError(f"Keep the token's name under {MAX_TOKEN_NAME_LENGTH} characters.", field="name")
    raw = new_api_token()
    api_token = ApiToken(user_id=user.id, name=label, token_hash=hash_token(raw))
    session.add(api_token)
    session.flush()
    return NewApiToken(token=raw, api_token=api_token)


def revoke_api_token(session: Session, user: User, token_id: uuid.UUID) -> bool:
    """Revoke one of ``user``'s live tokens; False when there is no such token of theirs."""
    api_token = repository.active_token(session, user.id, token_id)
    if api_token is None:
        return False
    api_token.revoked_at = utcnow()
    session.flush()
    return True
