"""The browser session cookie: set at sign-in, cleared at sign-out."""

from __future__ import annotations

from starlette.responses import Response

from app.config import Settings
from app.security import ANONYMOUS_CSRF_COOKIE, SESSION_COOKIE


def set_session_cookie(response: Response, token: str, settings: Settings) -> None:
    """HttpOnly (no script reads it), SameSite=Lax (no cross-site posts carry it), Secure behind TLS."""
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=settings.session_days * 24 * 3600,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
        path="/",
    )
    # The visitor's pre-login CSRF token is done with: forms now carry the session's.
    response.delete_cookie(ANONYMOUS_CSRF_COOKIE, path="/")


def clear_session_cookie(response: Response, settings: Settings) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=settings.cookie_secure)
