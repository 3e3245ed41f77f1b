"""What the studio does by email: confirming an address, and resetting a forgotten password.

**Address confirmation.** At sign-up the person gets a link carrying a signed token (itsdangerous,
keyed by the studio's secret key) that names the account, the address and when it was issued. It
works for ``settings.email_verification_hours`` and once: a confirmed account's link is spent, and
a link for an address the account no longer has is refused. Unconfirmed accounts use the studio;
``settings.require_verified_email`` keeps them from starting trainings.

**Password reset.** A random token, of which only the SHA-256 is stored, valid for
``settings.password_reset_minutes`` and spent by its first use. Asking for one answers the same
whatever the address (no one learns who has an account here), and the work that differs (writing a
message for a real account) happens in the request's transaction while the sending happens in a
task, so the answer takes as long either way. A reset ends every session and revokes every API
token (:func:`app.accounts.service.sign_out_everywhere`): whoever knew the old password is out.

Services flush; the caller commits; the messages leave after the commit (app.mail.outbox).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from app.accounts import repository
from app.accounts.service import AccountError, SignedOut, normalize_email, sign_out_everywhere, validate_password
from app.config import Settings
from app.mail import queue_email
from app.models import PasswordReset, User, utcnow
from app.security import hash_password, hash_token, new_token

VERIFY_SALT = "studio.verify-email"
RESET_REQUESTED_MESSAGE = (
    "If an account uses this address, a link to choose a new password is on its way to it. "
    "Check your inbox (and your spam folder)."
)


class LinkError(AccountError):
    """A confirmation or reset link that cannot be used; the message says why and what to do."""


def _serializer(settings: Settings) -> URLSafeSerializer:
    return URLSafeSerializer(settings.secret_key, salt=VERIFY_SALT)


def _link(settings: Settings, path: str) -> str:
    return settings.base_url.rstrip("/") + path


# --- confirming the address ------------------------------------------------------------------------


def verification_token(settings: Settings, user: User, now: datetime | None = None) -> str:
    """A signed token naming ``user``, its current address and the time it was issued."""
    issued = int((now or utcnow()).timestamp())
    return str(_serializer(settings).dumps({"u": str(user.id), "e": user.email, "t": issued}))


def send_verification(session: Session, settings: Settings, user: User, now: datetime | None = None) -> None:
    """Queue the "confirm your address" message for ``user`` (sent after the caller commits)."""
    token = verification_token(settings, user, now)
    queue_email(session, user.email, "verify_email", email=user.email, base_url=settings.base_url,
                link=_link(settings, f"/verify-email?token={token}"), hours=settings.email_verification_hours)


def verify_email(session: Session, settings: Settings, token: str, now: datetime | None = None) -> User:
    """Confirm the address a link was sent to; raises :class:`LinkError` for a bad, expired or spent link."""
    try:
        payload = _serializer(settings).loads(token)
        user_id, email, issued = uuid.UUID(payload["u"]), str(payload["e"]), int(payload["t"])
    except (BadSignature, KeyError, TypeError, ValueError):
        raise LinkError("This confirmation link is not valid. Copy the whole link from the email, or ask for "
                        "a new one on your account page.") from None
    now = now or utcnow()
    user = session.get(User, user_id)
    if user is None or user.email != email or not user.is_active:
        raise LinkError("This confirmation link is not valid any more. Ask for a new one on your account page.")
    if user.email_verified_at is not None:
        raise LinkError("This link was already used: your address is confirmed.")
    if now - datetime.fromtimestamp(issued, UTC) > timedelta(hours=settings.email_verification_hours):
        raise LinkError(f"This confirmation link has expired (links work for {settings.email_verification_hours} "
                        "hours). Ask for a new one on your account page.")
    user.email_verified_at = now
    session.flush()
    return user


# --- resetting a forgotten password ----------------------------------------------------------------


def request_password_reset(session: Session, settings: Settings, email: str, now: datetime | None = None) -> None:
    """Queue a reset link for the active account with ``email``, if there is one; silent either way.

    The caller answers :data:`RESET_REQUESTED_MESSAGE` whatever happened here, and counts the request
    on its rate limits before calling.
    """
    user = repository.user_by_email(session, normalize_email(email))
    if user is None or not user.is_active:
        return
    now = now or utcnow()
    # The account's spent and expired links are of no use to anyone: they go.
    session.execute(delete(PasswordReset).where(
        PasswordReset.user_id == user.id, or_(PasswordReset.used_at.is_not(None), PasswordReset.expires_at <= now)))
    raw = new_token(32)
    session.add(PasswordReset(user_id=user.id, token_hash=hash_token(raw),
                              expires_at=now + timedelta(minutes=settings.password_reset_minutes)))
    session.flush()
    queue_email(session, user.email, "password_reset", base_url=settings.base_url,
                link=_link(settings, f"/password/reset?token={raw}"), minutes=settings.password_reset_minutes)


def _live_reset(session: Session, token: str, now: datetime) -> PasswordReset:
    reset = session.scalars(select(PasswordReset).where(PasswordReset.token_hash == hash_token(token))).first()
    if reset is None:
        raise LinkError("This reset link is not valid. Copy the whole link from the email, or ask for a new one.")
    if reset.used_at is not None:
        raise LinkError("This reset link was already used. Ask for a new one if you need to.")
    if reset.expires_at <= now:
        raise LinkError("This reset link has expired. Ask for a new one.")
    return reset


def check_reset_link(session: Session, token: str, now: datetime | None = None) -> None:
    """Raise :class:`LinkError` unless ``token`` is a reset link that can still be used (for the form)."""
    _live_reset(session, token, now or utcnow())


def reset_password(session: Session, settings: Settings, token: str, new_password: str,
                   now: datetime | None = None) -> tuple[User, SignedOut]:
    """Set a new password with a reset link; every session and API token of the account ends.

    Raises :class:`LinkError` (bad, expired or spent link) or AccountError (field "password") for a
    password that breaks the rules, which leaves the link usable. Every other unused link of the
    account is spent too. Following the link proves the address, so it counts as confirmed.
    """
    now = now or utcnow()
    reset = _live_reset(session, token, now)
    user = session.get(User, reset.user_id)
    if user is None or not user.is_active:
        raise LinkError("This reset link is not valid any more.")
    validate_password(new_password)
    # Spent with a conditional update: of two uses at once, only one finds it unused.
    spent = session.execute(
        update(PasswordReset).where(PasswordReset.user_id == user.id, PasswordReset.used_at.is_(None))
        .values(used_at=now).execution_options(synchronize_session=False)
    )
    if int(getattr(spent, "rowcount", 0) or 0) == 0:
        raise LinkError("This reset link was already used. Ask for a new one if you need to.")
    session.expire(reset)
    user.password_hash = hash_password(new_password)
    if user.email_verified_at is None:
        user.email_verified_at = now
    session.flush()
    ended = sign_out_everywhere(session, user)
    queue_email(session, user.email, "password_changed", base_url=settings.base_url)
    return user, ended


def forget_old_reset_links(session: Session, now: datetime | None = None) -> int:
    """Delete reset links that expired (used or not) over a day ago; the hourly retention pass calls it."""
    before = (now or utcnow()) - timedelta(days=1)
    result = session.execute(delete(PasswordReset).where(PasswordReset.expires_at <= before))
    return int(getattr(result, "rowcount", 0) or 0)
