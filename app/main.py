"""The web app: ``create_app(settings=None)`` builds it; uvicorn calls the factory.

    uvicorn --factory app.main:create_app

No app is created at import, so importing this module reads no environment and opens nothing.
The web process never imports torch: only ``worker.engine.prompts`` of the worker is allowed here.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import importlib.resources
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.routing import iter_route_contexts
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import Response
from starlette.routing import compile_path, get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app import config as config_module
from app import db as db_module
from app import logs, openapi
from app import storage as storage_module
from app.access_log import quiet_polling
from app.accounts import api as accounts_api
from app.accounts import pages as accounts_pages
from app.body_guard import BodyGuardMiddleware
from app.config import Settings
from app.deps import API_PREFIX, LoginRequired, OptionalUser, bearer_token
from app.galleries import api as galleries_api
from app.galleries import pages as galleries_pages
from app.jobs import api as jobs_api
from app.jobs import pages as jobs_pages
from app.operator import api as operator_api
from app.operator import health
from app.operator import pages as operator_pages
from app.operator.metrics import LatencyMiddleware, Metrics
from app.photos.faces import load_face_model
from app.security import tokens_equal
from app.subjects import api as subjects_api
from app.subjects import pages as subjects_pages
from app.templating import STATIC_DIR, render

STATIC_PREFIX = "/static/"


# --- middleware -----------------------------------------------------------------------------------


def content_security_policy(settings: Settings) -> str:
    """Same-origin everything, no inline scripts or styles, never framed.

    With S3 storage the gallery may show images from short-lived signed URLs on the bucket's
    origin, so that origin is allowed for images only.
    """
    image_sources = ["'self'", "data:", "blob:"]
    # Browsers fetch signed URLs from the public endpoint when one is set (an optional setting).
    bucket_url = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    if settings.storage_backend == "s3" and bucket_url:
        parts = urlsplit(bucket_url)
        image_sources.append(f"{parts.scheme}://{parts.netloc}")
    directives = [
        "default-src 'self'",
        f"img-src {' '.join(image_sources)}",
        "script-src 'self'",
        "style-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
    return "; ".join(directives)


# Swagger UI's own files, from the fastapi-offline package: the docs page loads nothing from a CDN.
SWAGGER_ASSETS_DIR = Path(str(importlib.resources.files("fastapi_offline") / "static"))
SWAGGER_ASSETS_PREFIX = "/static/api-docs"
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def api_docs_response(openapi_url: str) -> Response:
    """Swagger UI for the JSON API, served from this site, with a CSP of its own.

    The page starts Swagger UI with one inline script. Rather than allow inline scripts, the CSP
    names that exact script by its SHA-256, so nothing else inline can run.
    """
    page = get_swagger_ui_html(
        openapi_url=openapi_url,
        title="Photo Studio API",
        swagger_js_url=f"{SWAGGER_ASSETS_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_ASSETS_PREFIX}/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
    )
    body = bytes(page.body).decode()
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in INLINE_SCRIPT.findall(body)
    )
    policy = "; ".join([
        "default-src 'self'",
        f"script-src 'self' {hashes}",
        # Swagger UI sets styles from its script; the page shows no user content.
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'self'",
        "frame-ancestors 'none'",
    ])
    return HTMLResponse(body, headers={"Content-Security-Policy": policy})


def security_headers(settings: Settings) -> list[tuple[bytes, bytes]]:
    """The headers every answer carries (a header the answer sets itself wins)."""
    headers = [
        (b"content-security-policy", content_security_policy(settings).encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
        (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    ]
    if settings.cookie_secure:
        headers.append((b"strict-transport-security", b"max-age=31536000; includeSubDomains"))
    return headers


class SecurityHeadersMiddleware:
    """Adds the security headers to every response; private responses are never cached.

    Starlette answers an unhandled exception outside every middleware added here (its
    ServerErrorMiddleware is the outermost layer), so :func:`server_error_handler` adds the same
    headers to the 500 itself.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.headers = security_headers(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_static = scope["path"].startswith(STATIC_PREFIX)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(header for header in self.headers if header[0] not in present)
                if b"cache-control" not in present:
                    # Static files are versioned by ?v=...; everything else may be private.
                    cache = b"public, max-age=86400" if is_static else b"no-store"
                    headers.append((b"cache-control", cache))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestTooLarge(Exception):
    """The request body passed the limit while it was being read."""


def too_large_response(scope: Scope, limit: int) -> Response:
    megabytes = limit / (1024 * 1024)
    detail = f"The request is too large: the limit is {megabytes:.0f} MB."
    if scope["path"].startswith(API_PREFIX) or _prefers_json(scope):
        return JSONResponse({"detail": detail}, status_code=413)
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Too large</title></head>"
        f"<body><h1>Upload too large</h1><p>{detail} Choose fewer or smaller photos and try again.</p>"
        '<p><a href="/">Back to the studio</a></p></body></html>'
    )
    return HTMLResponse(body, status_code=413)


def _prefers_json(scope: Scope) -> bool:
    accept = ""
    for name, value in scope.get("headers", []):
        if name == b"accept":
            accept = value.decode("latin-1")
    return "application/json" in accept and "text/html" not in accept


class BodySizeLimitMiddleware:
    """Answers 413 to a body over ``limit`` bytes: at once from Content-Length, or as soon as the stream passes it.

    A client can lie about (or omit) Content-Length, so the bytes are also counted as they arrive.
    When the limit is passed mid-stream the app's own answer (often a 400 from a parser that saw
    the read fail) is replaced by the 413, provided nothing was sent yet.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await JSONResponse({"detail": "Invalid Content-Length header."}, status_code=400)(
                        scope, receive, send
                    )
                    return
                if declared > self.limit:
                    await too_large_response(scope, self.limit)(scope, receive, send)
                    return

        received = 0
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise RequestTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise RequestTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                if not response_started:
                    response_started = True
                    await too_large_response(scope, self.limit)(scope, receive, send)
                return  # the app's own answer to the broken read is dropped
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except RequestTooLarge:
            if not response_started:
                response_started = True
                await too_large_response(scope, self.limit)(scope, receive, send)
        except Exception:
            if exceeded and not response_started:
                response_started = True
                await too_large_response(scope, self.limit)(scope, receive, send)
                return
            raise


# --- errors ---------------------------------------------------------------------------------------


def wants_json(request: Request) -> bool:
    """API paths answer JSON; pages answer HTML unless the client asks for JSON only."""
    return request.url.path.startswith(API_PREFIX) or _prefers_json(request.scope)


ERROR_TITLES = {
    400: "That request did not work",
    401: "Please sign in",
    403: "Not allowed",
    404: "Page not found",
    405: "Not allowed",
    409: "Conflict",
    413: "Too large",
    422: "Please check the form",
    429: "Too many attempts",
    503: "Busy right now",
}


FRIENDLY_MESSAGES = {
    404: "We could not find that page. The link may be wrong, or what it showed was deleted.",
    405: "That address does not take this kind of request.",
}


def error_page(request: Request, status_code: int, detail: Any, headers: dict[str, str] | None = None) -> Response:
    message = detail if isinstance(detail, str) else "The request could not be processed."
    try:
        generic = message == HTTPStatus(status_code).phrase  # Starlette's default detail: say something useful
    except ValueError:
        generic = False
    if generic:
        message = FRIENDLY_MESSAGES.get(status_code, message)
    title = ERROR_TITLES.get(status_code, "Something went wrong")
    return render(
        request, "error.html", {"status_code": status_code, "title": title, "message": message},
        status_code=status_code, headers=headers,
    )


@lru_cache(maxsize=1024)
def _path_pattern(path: str) -> re.Pattern[str]:
    return compile_path(path)[0]


def allowed_methods(request: Request) -> str:
    """Every method some route of the app takes at this path, for the ``Allow`` header of a 405.

    Starlette names only the methods of the first route whose path matches, but a path such as
    /api/v1/subjects/{id} is served by several routes (GET and DELETE), even from several routers.
    """
    path = get_route_path(request.scope)
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        if route.path and route.methods and _path_pattern(route.path).match(path):
            methods |= route.methods
    return ", ".join(sorted(methods))


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    if wants_json(request) or exc.status_code in (204, 304):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
    return error_page(request, exc.status_code, exc.detail, headers)


async def validation_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = json.loads(json.dumps(exc.errors(), default=str))
    if wants_json(request):
        return JSONResponse({"detail": errors}, status_code=422)
    fields = ", ".join(str(error.get("loc", ["?"])[-1]) for error in errors)
    return error_page(request, 422, f"Some fields are missing or invalid: {fields}.")


async def login_required_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    return RedirectResponse(f"/login?next={quote(exc.next_path, safe='')}", status_code=303)


# Seconds a client is asked to wait before trying again while the database is away.
DATABASE_RETRY_AFTER_SECONDS = 5
DATABASE_UNAVAILABLE_DETAIL = "The studio's database is not reachable right now. Please try again in a few seconds."


async def database_error_handler(request: Request, exc: Exception) -> Response:
    """503 with Retry-After while the database is down or out of connections; other errors stay 500s.

    Answered here, inside the app, so no exception reaches the server: uvicorn keeps the client's
    connection open (an exception that escapes the app makes it close the connection after a 500).
    """
    if not db_module.is_database_unavailable(exc):
        raise exc
    headers = {"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)}
    if wants_json(request):
        return JSONResponse({"detail": DATABASE_UNAVAILABLE_DETAIL}, status_code=503, headers=headers)
    # A plain page: the usual error template may look up who is asking, in the database.
    return HTMLResponse(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Back soon</title></head>"
        f"<body><h1>Back in a moment</h1><p>{DATABASE_UNAVAILABLE_DETAIL}</p></body></html>",
        status_code=503, headers=headers,
    )


async def server_error_handler(request: Request, exc: Exception) -> Response:
    """The 500 answer, with the security headers: it is sent from outside SecurityHeadersMiddleware."""
    detail = "Something went wrong on our side. Please try again in a moment."
    response: Response
    if wants_json(request):
        response = JSONResponse({"detail": detail}, status_code=500)
    else:
        response = HTMLResponse(
            "<!doctype html><html lang=en><head><meta charset=utf-8><title>Error</title></head>"
            f"<body><h1>Sorry</h1><p>{detail}</p></body></html>",
            status_code=500,
        )
    for name, value in security_headers(request.app.state.settings):
        response.headers[name.decode()] = value.decode()
    response.headers["cache-control"] = "no-store"
    return response


# --- the app --------------------------------------------------------------------------------------


def _session_factory(settings: Settings) -> tuple[sessionmaker[Session], Engine | None]:
    """The process-wide sessionmaker when the settings are the process's, else one on a private engine."""
    try:
        shared = config_module.get_settings().resolved_database_url == settings.resolved_database_url
    except ValueError:
        shared = False
    if shared:
        return db_module.get_sessionmaker(), None
    engine = db_module.make_engine(
        settings.resolved_database_url, settings.database_pool_size, settings.database_max_overflow
    )
    return sessionmaker(bind=engine, expire_on_commit=False), engine


def _storage(settings: Settings) -> Any:
    try:
        shared = config_module.get_settings().resolved_media_dir == settings.resolved_media_dir and (
            config_module.get_settings().storage_backend == settings.storage_backend
        )
    except ValueError:
        shared = False
    return storage_module.get_storage() if shared else storage_module.make_storage(settings)


def freeze_startup_objects() -> None:
    """Take what start-up built (modules, routes, schemas, mappers) out of the garbage collector's sight.

    Those objects live as long as the process, yet every full collection walks them all: in the
    web process that is a pause of 40–75 ms every few seconds, which every request in flight waits
    out (bench/web.py's status p99). Frozen, a full collection walks only what requests created.
    Tests skip it: they build many apps in one process, and garbage frozen between them would leak.
    """
    gc.collect()
    gc.freeze()


def request_slots(pool_size: int, max_overflow: int) -> int:
    """How many requests may hold a database session at once (see app.deps.get_db_session).

    At most half of all connections, because a request may also open a short second session. And
    no more than the pool keeps open: above that, every extra request opens an overflow connection
    and closes it afterwards, and a new PostgreSQL connection (a forked backend) costs more than
    the poll it serves. The overflow stays for second sessions and downloads that stream.
    """
    return max(1, min(pool_size, (pool_size + max_overflow) // 2))


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the studio's web app for ``settings`` (default: from the environment)."""
    settings = settings or config_module.get_settings()
    logs.configure_logging(settings)
    session_factory, private_engine = _session_factory(settings)
    quiet_polling()  # the studio page's status polls would bury everything else in the access log

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for directory in (settings.var_dir, settings.resolved_media_dir, settings.scratch_dir):
            if settings.storage_backend == "s3" and directory == settings.resolved_media_dir:
                continue
            directory.mkdir(parents=True, exist_ok=True)
        if settings.environment != "test":  # tests build many apps, most with no person in them
            load_face_model()
            freeze_startup_objects()
        yield
        if private_engine is not None:
            private_engine.dispose()

    app = FastAPI(
        title="Photo studio",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # served below with its own CSP
        redoc_url=None,
    )
    app.state.settings = settings
    openapi.install(app, settings)
    app.state.sessionmaker = session_factory
    app.state.session_slots = asyncio.Semaphore(request_slots(settings.database_pool_size,
                                                              settings.database_max_overflow))
    app.state.password_hash_slots = asyncio.Semaphore(settings.password_hash_slots)
    app.state.storage = _storage(settings)
    app.state.metrics = metrics = Metrics(session_factory, settings)

    # add_middleware wraps: the last added runs first, so security headers land on every answer.
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    app.add_middleware(BodyGuardMiddleware, read_timeout=settings.request_body_timeout_seconds,
                       photo_limit=settings.max_photo_bytes)
    app.add_middleware(BodySizeLimitMiddleware, limit=settings.request_body_limit)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(SecurityHeadersMiddleware, settings=settings)
    if settings.trusted_proxies:
        # Outermost: everything inside (the rate limits' client_key, url_for) sees the address and
        # scheme the trusted proxy saw. Forwarded headers from any other peer are ignored; that is
        # why ``studio web`` starts uvicorn without its own proxy-header handling.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)

    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, validation_exception_handler)
    app.add_exception_handler(LoginRequired, login_required_handler)
    app.add_exception_handler(SQLAlchemyError, database_error_handler)
    app.add_exception_handler(Exception, server_error_handler)

    # Before /static, which would otherwise answer these paths.
    app.mount(SWAGGER_ASSETS_PREFIX, StaticFiles(directory=SWAGGER_ASSETS_DIR), name="api-docs-assets")
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")

    @app.get("/", include_in_schema=False, name="home")
    def home(request: Request, user: OptionalUser) -> Response:
        return render(request, "home.html", {})

    @app.get("/api/v1/docs", include_in_schema=False)
    def api_docs() -> Response:
        return api_docs_response(app.openapi_url or "/api/v1/openapi.json")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        """Liveness for compose and load balancers: the process answers and the database does too."""
        try:
            with session_factory() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> Response:
        """Readiness: the database, the broker, the storage and a GPU worker's heartbeat; 503 names what failed."""
        result = health.readiness(settings, session_factory, app.state.storage)
        body = {"status": "ready" if result.ready else "unavailable", "failed": result.failed,
                "checks": result.checks}
        return JSONResponse(body, status_code=200 if result.ready else 503, headers={"Cache-Control": "no-store"})

    @app.get("/metrics", include_in_schema=False)
    def metrics_endpoint(request: Request) -> Response:
        """Prometheus metrics for a scraper that sends ``Authorization: Bearer <STUDIO_METRICS_TOKEN>``.

        Without a configured token there is no /metrics (404); a wrong or missing token is a 401."""
        if not settings.metrics_token:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if not tokens_equal(settings.metrics_token, bearer_token(request)):
            return JSONResponse({"detail": "A valid metrics token is required."}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    for module in (
        accounts_api, accounts_pages, subjects_api, subjects_pages,
        jobs_api, jobs_pages, galleries_api, galleries_pages, operator_api, operator_pages,
    ):
        app.include_router(module.router)
    return app
