"""Typed dependencies every route uses: the request's database session, settings, storage, who is asking, CSRF.

Use them as annotations::

    @router.post("/studios/{subject_id}/delete", dependencies=[Depends(require_csrf)])
    def delete(subject_id: uuid.UUID, user: PageUser, session: SessionDep, storage: StorageDep) -> Response: ...

The session's transaction belongs to the dependency: it commits when the handler returns without
an exception and rolls back when it raises, *before* the response goes out (so a client that got
200 can read what it wrote, and a failed commit is a 500, not a silent loss). Services only flush.
A handler that wants to answer an error without keeping its writes raises, or calls
``session.rollback()`` itself. The session is closed once the handler returns: a streaming
response must load what it needs first, or open its own ``app.db.session_scope()``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from app.config import Settings
from app.db import commit_and_close, rollback_and_close, session_scope
from app.models import ApiToken, User, UserSession, utcnow
from app.security import (
    ANONYMOUS_CSRF_COOKIE,
    CSRF_FORM_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    hash_token,
    new_token,
    tokens_equal,
)
from app.storage import Storage

T = TypeVar("T")

API_PREFIX = "/api/"

# last_used_at of an API token is refreshed at most this often, so reads stay reads.
TOKEN_TOUCH_INTERVAL = timedelta(minutes=5)
# Form fields other than files are small (names, prompts); files are counted by the upload code.
MAX_FORM_FIELDS = 200
MAX_FORM_FIELD_BYTES = 64 * 1024


class LoginRequired(Exception):
    """Raised by ``PageUser`` for a visitor without a valid session; answered with a 303 to /login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass(frozen=True)
class Auth:
    """Who sent the request and how: through the browser session cookie, a bearer token, or nobody."""

    user: User | None = None
    user_session: UserSession | None = None
    api_token: ApiToken | None = None
    bearer_given: bool = False

    @property
    def via(self) -> str | None:
        if self.api_token is not None:
            return "bearer"
        if self.user_session is not None:
            return "cookie"
        return None


# --- settings, session, storage -------------------------------------------------------------------


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with (``create_app(settings)``)."""
    settings: Settings = request.app.state.settings
    return settings


async def get_db_session(request: Request) -> AsyncIterator[Session]:
    """One session per request; commits on success, rolls back on error (see the module docstring).

    At most ``app.state.session_slots`` requests hold a session at once; the others wait here, in
    the event loop. Sync handlers run in a thread pool, and a request keeps its connection from
    its first query until the commit, across several thread hops. Unbounded, a burst fills every
    thread with requests waiting for a connection while the requests that hold the connections
    wait for a thread: a deadlock until the pool times out. With fewer slots than connections, no
    thread ever waits for one.
    """
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    slots: asyncio.Semaphore = request.app.state.session_slots
    async with slots:
        session = factory()
        try:
            yield session
        except BaseException:
            await run_in_threadpool(rollback_and_close, session)
            # The rollback expired the cached Auth's rows; an error page re-resolves them in a new session.
            request.state.auth = None
            raise
        try:
            # Commit and close in one trip to the thread pool: each trip costs latency under load.
            await run_in_threadpool(commit_and_close, session)
        except BaseException:
            request.state.auth = None
            raise


# Seconds a client refused for want of a password-hash slot is asked to wait before trying again.
BUSY_RETRY_AFTER = 5


async def password_hash_slot(request: Request) -> AsyncIterator[None]:
    """Hold one of the process's password-hash slots for the request (sign-up, sign-in, password change).

    An argon2 hash takes 64 MiB while it runs: 40 sign-ups at once grew a web process by 640 MB.
    At most ``settings.password_hash_slots`` requests hash at once; the others wait here, in the
    event loop, before they take a thread or a database session, for up to
    ``settings.password_hash_wait_seconds``, and then get 503 with Retry-After. List it in the
    route's ``dependencies`` before ``require_csrf``, so a waiting request holds nothing else.
    """
    settings: Settings = request.app.state.settings
    slots: asyncio.Semaphore = request.app.state.password_hash_slots
    try:
        async with asyncio.timeout(settings.password_hash_wait_seconds):
            await slots.acquire()
    except TimeoutError:
        raise HTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"The studio is busy checking other passwords. Try again in {BUSY_RETRY_AFTER} seconds.",
            headers={"Retry-After": str(BUSY_RETRY_AFTER)},
        ) from None
    try:
        yield
    finally:
        slots.release()


# scope="function": the slot is given back as soon as the handler (and its commit) is done.
PasswordHashSlot = Depends(password_hash_slot, scope="function")


async def get_app_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
# scope="function": the commit happens before the response is sent, not after.
SessionDep = Annotated[Session, Depends(get_db_session, scope="function")]
StorageDep = Annotated[Storage, Depends(get_app_storage)]


# --- who is asking --------------------------------------------------------------------------------


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None when there is none."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def user_for_session_cookie(session: Session, raw_token: str) -> tuple[User, UserSession] | None:
    """The live (not revoked, not expired) browser session of ``raw_token`` and its active user."""
    row = session.execute(
        select(UserSession, User)
        .join(User, User.id == UserSession.user_id)
        .where(
            UserSession.token_hash == hash_token(raw_token),
            UserSession.revoked_at.is_(None),
            UserSession.expires_at > utcnow(),
            User.is_active.is_(True),
        )
    ).first()
    if row is None:
        return None
    return row[1], row[0]


def user_for_api_token(session: Session, raw_token: str) -> tuple[User, ApiToken] | None:
    """The user of a live API token, refreshing the token's ``last_used_at`` now and then."""
    row = session.execute(
        select(ApiToken, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_hash == hash_token(raw_token), ApiToken.revoked_at.is_(None), User.is_active.is_(True))
    ).first()
    if row is None:
        return None
    api_token, user = row[0], row[1]
    now = utcnow()
    if api_token.last_used_at is None or now - api_token.last_used_at > TOKEN_TOUCH_INTERVAL:
        api_token.last_used_at = now
        session.flush()
    return user, api_token


def resolve_auth(request: Request, session: Session) -> Auth:
    """Who is asking, looked up once per request and kept on ``request.state.auth``.

    A bearer header wins over the cookie: a script that sends a wrong token gets 401 even from a
    browser that happens to be signed in.
    """
    cached: Auth | None = getattr(request.state, "auth", None)
    if cached is not None:
        return cached
    auth = Auth()
    token = bearer_token(request)
    if token is not None:
        found_token = user_for_api_token(session, token)
        auth = Auth(user=found_token[0], api_token=found_token[1], bearer_given=True) if found_token else Auth(
            bearer_given=True
        )
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            found_session = user_for_session_cookie(session, cookie)
            if found_session is not None:
                auth = Auth(user=found_session[0], user_session=found_session[1])
    request.state.auth = auth
    return auth


def get_auth(request: Request, session: SessionDep) -> Auth:
    return resolve_auth(request, session)


AuthDep = Annotated[Auth, Depends(get_auth)]


async def get_auth_briefly(request: Request) -> Auth:
    """Who is asking, looked up in a session of its own that is closed again before this returns.

    For the routes that go on to read a large body (photo uploads) and open their own session for
    the work afterwards (:func:`run_in_request_session`). With ``SessionDep`` the request would
    keep a session slot and a connection while a phone sends 200 MB, and a handful of slow uploads
    would stall every other request of the process. The user it holds is detached: read its
    columns, do not follow its relationships.
    """
    cached: Auth | None = getattr(request.state, "auth", None)
    if cached is not None:
        return cached
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    slots: asyncio.Semaphore = request.app.state.session_slots

    def lookup() -> Auth:
        with session_scope(factory) as session:
            return resolve_auth(request, session)

    async with slots:
        return await run_in_threadpool(lookup)


BriefAuthDep = Annotated[Auth, Depends(get_auth_briefly)]


async def get_optional_user(auth: AuthDep) -> User | None:
    """The signed-in user of a page (cookie), or None for a visitor."""
    return auth.user if auth.user_session is not None else None


def page_user_of(request: Request, auth: Auth) -> User:
    """The signed-in user of a page; a visitor is sent to /login?next=<this page>."""
    if auth.user is None or auth.user_session is None:
        next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(next_path)
    return auth.user


async def get_page_user(request: Request, auth: AuthDep) -> User:
    return page_user_of(request, auth)


async def get_page_user_briefly(request: Request, auth: BriefAuthDep) -> User:
    return page_user_of(request, auth)


def api_user_of(auth: Auth) -> User:
    """The user of an API request: a bearer token, or the browser's session cookie; 401 otherwise."""
    if auth.user is None:
        detail = "The bearer token is invalid or revoked." if auth.bearer_given else "Not authenticated."
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
        )
    return auth.user


async def get_api_user(auth: AuthDep) -> User:
    return api_user_of(auth)


async def get_api_user_briefly(auth: BriefAuthDep) -> User:
    return api_user_of(auth)


OptionalUser = Annotated[User | None, Depends(get_optional_user)]
PageUser = Annotated[User, Depends(get_page_user)]
ApiUser = Annotated[User, Depends(get_api_user)]


async def run_in_request_session(request: Request, work: Callable[[Session, Auth], T]) -> T:
    """``work(session, auth)`` in a session of its own, in a single trip to the thread pool.

    The rules are ``SessionDep``'s: a session slot, commit when ``work`` returns, rollback when it
    raises (an ``HTTPException`` included). Who is asking is looked up again in this session, so
    ``work`` gets rows it may follow and change.
    """
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    slots: asyncio.Semaphore = request.app.state.session_slots

    def in_thread() -> T:
        request.state.auth = None
        try:
            with session_scope(factory) as session:
                return work(session, resolve_auth(request, session))
        except BaseException:
            request.state.auth = None
            raise

    async with slots:
        return await run_in_threadpool(in_thread)


async def run_as_api_user(request: Request, work: Callable[[Session, User], T]) -> T:
    """``work(session, user)`` for the API user of ``request``, in a single trip to the thread pool.

    For the endpoints browsers poll. A plain route with ``ApiUser`` and ``SessionDep`` makes three
    trips or more (who is asking, the handler, the commit; a sync handler's response is validated
    in another), and under load each one waits its turn behind the event loop and the other
    threads for the GIL: most of a poll's latency was that waiting, not the queries.

    The rules are the same as ``SessionDep``'s: a session slot, commit on success, rollback when
    ``work`` raises (an ``HTTPException`` included), 401 without a valid user.
    """
    return await run_in_request_session(request, lambda session, auth: work(session, api_user_of(auth)))


# --- forms and CSRF -------------------------------------------------------------------------------


async def close_form_after_request(request: Request) -> AsyncIterator[None]:
    """Close the request's parsed form (its spooled upload files) once the request is over.

    FastAPI closes the forms it parses for ``Form()`` parameters, but not one parsed by hand with
    ``request.form()``/``read_form``. ``require_csrf`` depends on this, so every protected form is covered.
    """
    try:
        yield
    finally:
        await request.close()


async def read_form(request: Request) -> FormData:
    """The request's form, parsed once with the studio's limits (Starlette caches it on the request).

    Upload handlers call this instead of ``request.form()`` so the limits stay in one place:
    at most ``settings.max_photos`` files, ``MAX_FORM_FIELDS`` fields, 64 KiB per text field.
    A form over a limit is a 400 naming it. The route should depend on ``close_form_after_request``
    (``require_csrf`` does) so spooled files are closed.
    """
    settings: Settings = request.app.state.settings
    return await request.form(
        max_files=settings.max_photos, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_FIELD_BYTES
    )


def anonymous_csrf_token(request: Request) -> str:
    """The CSRF token of a visitor without a session: the cookie's, or a new one that ``render`` will set."""
    existing = request.cookies.get(ANONYMOUS_CSRF_COOKIE) or getattr(request.state, "new_anonymous_csrf", None)
    if existing:
        return str(existing)
    token = new_token(24)
    request.state.new_anonymous_csrf = token
    return token


def expected_csrf_token(request: Request, auth: Auth) -> str | None:
    """The token a form of this requester must carry: its session's, or a visitor's cookie token."""
    if auth.user_session is not None:
        return auth.user_session.csrf_token
    return request.cookies.get(ANONYMOUS_CSRF_COOKIE)


async def require_csrf(
    request: Request, auth: AuthDep, _form_cleanup: Annotated[None, Depends(close_form_after_request)]
) -> None:
    """Refuse (403) a state-changing browser request without the right CSRF token.

    The token comes from the ``X-CSRF-Token`` header or the ``csrf_token`` form field. Requests
    with a bearer token are exempt: a browser never attaches one on its own, so another site
    cannot forge them.
    """
    await check_csrf(request, auth)


async def require_csrf_briefly(
    request: Request, auth: BriefAuthDep, _form_cleanup: Annotated[None, Depends(close_form_after_request)]
) -> None:
    """:func:`require_csrf` for the routes that look up who is asking with :func:`get_auth_briefly`."""
    await check_csrf(request, auth)


async def check_csrf(request: Request, auth: Auth) -> None:
    if auth.bearer_given:
        return
    if auth.user is None and request.url.path.startswith(API_PREFIX):
        # Nobody is signed in, so there is no session to forge a request for: the API's answer
        # is that authentication is missing (401), not that a form token is.
        api_user_of(auth)
    given = request.headers.get(CSRF_HEADER)
    if not given:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            value = (await read_form(request)).get(CSRF_FORM_FIELD)
            given = value if isinstance(value, str) else None
    if not tokens_equal(expected_csrf_token(request, auth), given):
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail="The form's security token is missing or out of date. Reload the page and try again.",
        )


CsrfDep = Depends(require_csrf)


def client_key(request: Request) -> str:
    """The key rate limits count by: the client's address.

    That is the peer of the connection, unless the peer is one of ``STUDIO_TRUSTED_PROXIES``: then
    the app's proxy-headers middleware (app.main) has already put the address from
    X-Forwarded-For in its place. Anybody else's X-Forwarded-For is ignored, so a client cannot
    escape its per-address limit by rotating the header.
    """
    return request.client.host if request.client else "unknown"


def parse_uuid(value: str) -> uuid.UUID | None:
    """``value`` as a UUID, or None when it is not one (routes answer 404 for a malformed id)."""
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
