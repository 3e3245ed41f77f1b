"""Rendering pages: one ``render`` that every page uses, and one-shot flash messages.

``render`` returns Starlette's TemplateResponse, so tests read ``response.template.name`` and
``response.context`` instead of parsing HTML. Every page's context has:

- ``user``: the signed-in User or None,
- ``csrf_token``: the token forms must send as the ``csrf_token`` field (``{{ csrf_field() }}``),
- ``settings``: the app's Settings,
- ``flash``: a FlashMessage set by the previous response (``redirect_with_flash``), or None.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer
from markupsafe import Markup, escape
from starlette.responses import Response

from app.config import Settings
from app.deps import Auth, anonymous_csrf_token, resolve_auth
from app.jobs.service import format_duration
from app.security import ANONYMOUS_CSRF_COOKIE, CSRF_FORM_FIELD

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"
FLASH_COOKIE = "studio_flash"
FLASH_MAX_AGE_SECONDS = 300

FlashKind = Literal["success", "info", "warning", "error"]


@dataclass(frozen=True)
class FlashMessage:
    kind: FlashKind
    message: str


# --- Jinja helpers --------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _static_version(path: str, mtime_ns: int) -> str:
    return hashlib.sha256(f"{path}:{mtime_ns}".encode()).hexdigest()[:10]


def static_url(path: str) -> str:
    """``/static/<path>?v=<version>``: the version changes with the file, so browsers may cache it long."""
    file = STATIC_DIR / path
    try:
        version = _static_version(path, file.stat().st_mtime_ns)
    except OSError:
        return f"/static/{path}"
    return f"/static/{path}?v={version}"


def format_date(value: datetime | None) -> str:
    """25 Nov 2026."""
    return "" if value is None else f"{value.day} {value:%b %Y}"


def format_datetime(value: datetime | None) -> str:
    """25 Nov 2026, 14:05 UTC."""
    return "" if value is None else f"{value.day} {value:%b %Y, %H:%M} UTC"


def _make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    env = templates.env
    env.globals["static_url"] = static_url
    env.filters["date"] = format_date
    env.filters["datetime"] = format_datetime
    env.filters["duration"] = format_duration
    return templates


templates = _make_templates()


# --- flash messages -------------------------------------------------------------------------------


def _flash_serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.secret_key, salt="studio-flash")


def set_flash(request: Request, response: Response, message: str, kind: FlashKind = "success") -> Response:
    """Show ``message`` once on the next rendered page (a signed, short-lived cookie)."""
    settings: Settings = request.app.state.settings
    value = _flash_serializer(settings).dumps({"kind": kind, "message": message})
    response.set_cookie(
        FLASH_COOKIE, value, max_age=FLASH_MAX_AGE_SECONDS, httponly=True, samesite="lax",
        secure=settings.cookie_secure, path="/",
    )
    return response


def redirect_with_flash(request: Request, url: str, message: str, kind: FlashKind = "success") -> RedirectResponse:
    """A 303 to ``url`` (the answer to a form post) that shows ``message`` on the page it lands on."""
    response = RedirectResponse(url, status_code=303)
    set_flash(request, response, message, kind)
    return response


def read_flash(request: Request) -> FlashMessage | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    settings: Settings = request.app.state.settings
    try:
        data = _flash_serializer(settings).loads(raw, max_age=FLASH_MAX_AGE_SECONDS)
    except BadSignature:
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    message = data.get("message") if isinstance(data, dict) else None
    if kind not in ("success", "info", "warning", "error") or not isinstance(message, str):
        return None
    return FlashMessage(kind=kind, message=message)


# --- render ---------------------------------------------------------------------------------------


def _auth_for_render(request: Request) -> Auth:
    """The request's Auth; resolved here with a short session when the route did not ask for a user."""
    cached: Auth | None = getattr(request.state, "auth", None)
    if cached is not None:
        return cached
    factory = request.app.state.sessionmaker
    with factory() as session:
        auth = resolve_auth(request, session)
        session.commit()
    return auth


def render(
    request: Request,
    template_name: str,
    context: dict[str, Any] | None = None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """Render ``template_name`` with ``context`` plus ``user``, ``csrf_token``, ``settings`` and ``flash``."""
    auth = _auth_for_render(request)
    settings: Settings = request.app.state.settings
    page_user = auth.user if auth.user_session is not None else None
    csrf_token = auth.user_session.csrf_token if auth.user_session is not None else anonymous_csrf_token(request)
    flash = read_flash(request)

    full_context: dict[str, Any] = {
        "user": page_user,
        "csrf_token": csrf_token,
        "settings": settings,
        "flash": flash,
        "csrf_field": lambda: Markup(
            f'<input type="hidden" name="{CSRF_FORM_FIELD}" value="{escape(csrf_token)}">'
        ),
    }
    full_context.update(context or {})
    response = templates.TemplateResponse(
        request, template_name, full_context, status_code=status_code, headers=headers
    )
    if flash is not None:
        response.delete_cookie(FLASH_COOKIE, path="/")
    new_csrf = getattr(request.state, "new_anonymous_csrf", None)
    if new_csrf and page_user is None:
        response.set_cookie(
            ANONYMOUS_CSRF_COOKIE, new_csrf, httponly=True, samesite="lax", secure=settings.cookie_secure, path="/"
        )
    return response
