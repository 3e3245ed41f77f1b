"""Database engine and sessions. The wrapper owns the transaction: services flush, never commit."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings


def make_engine(url: str, pool_size: int = 10, max_overflow: int = 20) -> Engine:
    kwargs: dict[str, Any] = {}
    if not url.startswith("sqlite://") or url.startswith("sqlite:///"):
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        # A server may have closed an idle connection (restart, failover): test it on checkout.
        # A SQLite file cannot go stale, and the ping would cost every request a query.
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the web process read while a worker writes; foreign keys are off by default.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    return engine


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(settings.resolved_database_url, settings.database_pool_size, settings.database_max_overflow)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session] | None = None) -> Iterator[Session]:
    """A session (of ``factory``, default the process's) whose transaction commits when the block ends
    and rolls back on an exception."""
    session = (factory or get_sessionmaker())()
    try:
        yield session
    except BaseException:
        rollback_and_close(session)
        raise
    commit_and_close(session)


def commit_and_close(session: Session) -> None:
    """Commit (rolling back if the commit fails) and give the connection back to the pool."""
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def rollback_and_close(session: Session) -> None:
    try:
        session.rollback()
    finally:
        session.close()


def is_database_unavailable(error: BaseException) -> bool:
    """True for an error that says the database cannot serve now, as opposed to a wrong query.

    The server is down or restarting, the connection was cut, no pooled connection came free in
    time, or SQLite's file is busy. The web answers these with 503 and Retry-After; a worker
    keeps a task's message and tries again later (the database returns, the message must not be lost).
    """
    if isinstance(error, sa_exc.TimeoutError):  # the pool had no connection to give
        return True
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    if not isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
        return False
    if isinstance(error.orig, sqlite3.Error):
        # SQLite reports a missing table as an OperationalError too: that one is a bug, not an outage.
        message = str(error.orig).lower()
        return any(word in message for word in ("locked", "busy", "unable to open"))
    return True
