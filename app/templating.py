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
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import Request
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import pass_context
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


# --- dates, in the person's time zone --------------------------------------------------------------
# One format everywhere: "25 Nov 2026" and "25 Nov 2026, 15:05 UTC+1", in the zone the browser reports
# (studio.js writes it to this cookie and rewrites every <time data-when> with the same rules, so a
# date the page's script updates reads exactly like one the server wrote). Without the cookie: UTC.
TZ_COOKIE = "studio_tz"
# English month names of our own: locales disagree ("Sep" or "Sept"), and the script uses the same list.
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def zone_named(name: str | None) -> tzinfo:
    """The IANA zone ``name`` ("Europe/Berlin"), or UTC when it is missing or not a zone this machine knows."""
    if not name or len(name) > 64 or not re.fullmatch(r"[A-Za-z0-9_+\-/]+", name) or ".." in name:
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def person_zone(request: Request) -> tzinfo:
    """The time zone the person's browser reported (the ``studio_tz`` cookie), else UTC."""
    return zone_named(request.cookies.get(TZ_COOKIE))


def offset_label(offset: timedelta | None) -> str:
    """UTC, UTC+1, UTC-5, UTC+5:30."""
    minutes = int((offset or timedelta()).total_seconds() // 60)
    if minutes == 0:
        return "UTC"
    sign = "+" if minutes > 0 else "-"
    hours, rest = divmod(abs(minutes), 60)
    return f"UTC{sign}{hours}" + (f":{rest:02d}" if rest else "")


def format_date(value: datetime | None, zone: tzinfo = UTC) -> str:
    """25 Nov 2026 (the day in ``zone``)."""
    if value is None:
        return ""
    local = value.astimezone(zone)
    return f"{local.day} {MONTHS[local.month - 1]} {local.year}"


def format_datetime(value: datetime | None, zone: tzinfo = UTC) -> str:
    """25 Nov 2026, 14:05 UTC; in another zone 25 Nov 2026, 15:05 UTC+1."""
    if value is None:
        return ""
    local = value.astimezone(zone)
    return f"{format_date(local, zone)}, {local:%H:%M} {offset_label(local.utcoffset())}"


def time_tag(value: datetime | None, kind: Literal["date", "datetime"], zone: tzinfo = UTC) -> Markup:
    """``<time datetime=ISO data-when=kind>text</time>``: what studio.js rewrites in the browser's zone."""
    if value is None:
        return Markup("")
    text = format_date(value, zone) if kind == "date" else format_datetime(value, zone)
    iso = value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return Markup('<time datetime="{}" data-when="{}">{}</time>').format(iso, kind, text)


@pass_context
def _date_filter(context: Any, value: datetime | None) -> Markup:
    request = context.get("request")
    return time_tag(value, "date", person_zone(request) if request is not None else UTC)


@pass_context
def _datetime_filter(context: Any, value: datetime | None) -> Markup:
    request = context.get("request")
    return time_tag(value, "datetime", person_zone(request) if request is not None else UTC)


def _make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    env = templates.env
    env.globals["static_url"] = static_url
    env.filters["date"] = _date_filter
    env.filters["datetime"] = _datetime_filter
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
