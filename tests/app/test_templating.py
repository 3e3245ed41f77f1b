"""render's context, flash messages and the template helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from starlette.responses import Response

from app.config import Settings
from app.main import create_app
from app.models import User
from app.templating import (
    FLASH_COOKIE,
    format_date,
    format_datetime,
    format_duration,
    redirect_with_flash,
    render,
    time_tag,
    zone_named,
)
from tests.app.conftest import page_context, page_template

router = APIRouter()


@router.post("/test/flash")
def flash_then_redirect(request: Request) -> Response:
    return redirect_with_flash(request, "/test/page", "Saved <b>bold</b>", kind="success")


@router.get("/test/page")
def a_page(request: Request) -> Response:
    return render(request, "error.html", {"status_code": 200, "title": "A page", "message": "hello"}, status_code=202)


@pytest.fixture
def test_client(settings: Settings, clean_db: Engine) -> Iterator[TestClient]:
    app: FastAPI = create_app(settings)
    app.include_router(router)
    with TestClient(app) as client:
        yield client


def test_render_adds_the_shared_context(test_client: TestClient, make_user: Callable[..., User],
                                        login: Callable[..., TestClient], settings: Settings) -> None:
    response = test_client.get("/test/page")
    assert response.status_code == 202 and page_template(response) == "error.html"
    context = page_context(response)
    assert context["user"] is None and context["flash"] is None
    assert context["settings"].secret_key == settings.secret_key
    assert context["csrf_token"]

    login(test_client, make_user("ctx@example.com"))
    context = page_context(test_client.get("/test/page"))
    assert context["user"].email == "ctx@example.com"  # resolved by render although the route asked for no user


def test_flash_is_shown_once_and_escaped(test_client: TestClient) -> None:
    landed = test_client.post("/test/flash")
    flash = page_context(landed)["flash"]
    assert (flash.kind, flash.message) == ("success", "Saved <b>bold</b>")
    assert "Saved &lt;b&gt;bold&lt;/b&gt;" in landed.text
    assert page_context(test_client.get("/test/page"))["flash"] is None


def test_a_forged_flash_cookie_is_ignored(test_client: TestClient) -> None:
    test_client.cookies.set(FLASH_COOKIE, "eyJraW5kIjoiZXJyb3IifQ.forged.signature")
    assert page_context(test_client.get("/test/page"))["flash"] is None


def test_formatters() -> None:
    moment = datetime(2026, 11, 5, 14, 7, tzinfo=UTC)
    assert format_date(moment) == "5 Nov 2026"
    assert format_datetime(moment) == "5 Nov 2026, 14:07 UTC"
    assert format_date(None) == ""
    # In the person's zone, with its offset; the day is that zone's day.
    assert format_datetime(moment, zone_named("Europe/Berlin")) == "5 Nov 2026, 15:07 UTC+1"
    assert format_datetime(moment, zone_named("America/New_York")) == "5 Nov 2026, 09:07 UTC-5"
    assert format_datetime(moment, zone_named("Asia/Kolkata")) == "5 Nov 2026, 19:37 UTC+5:30"
    assert format_date(datetime(2026, 11, 5, 23, 30, tzinfo=UTC), zone_named("Asia/Tokyo")) == "6 Nov 2026"
    assert str(time_tag(moment, "date")) == '<time datetime="2026-11-05T14:07:00Z" data-when="date">5 Nov 2026</time>'
    # A cookie naming no zone this machine knows falls back to UTC rather than failing the page.
    for junk in ("", "Mars/Olympus", "../../etc/passwd", "x" * 100, None):
        assert zone_named(junk) is UTC
    assert format_duration(None) == ""
    assert format_duration(12) == "under a minute"
    assert format_duration(4 * 60 + 10) == "about 4 min"
    assert format_duration(3600) == "about 1 h"
    assert format_duration(80 * 60) == "about 1 h 20 min"
