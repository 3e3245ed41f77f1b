"""Readiness (``/readyz``): can this studio take work now? The database, the broker, the storage, and at
least one GPU worker heartbeating. ``/healthz`` stays the liveness check (app.main).

Each check answers "ok" or a sentence saying what failed; each is bounded by a few seconds, so a
load balancer's probe never hangs on a dead dependency.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import WorkerHeartbeat, utcnow
from app.storage import LocalStorage, Storage

CHECK_TIMEOUT_SECONDS = 3.0
PROBE_KEY = "readyz/probe"
GPU_QUEUE = "gpu"
OK = "ok"


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, str]  # name → "ok" or what failed

    @property
    def failed(self) -> list[str]:
        return [name for name, answer in self.checks.items() if answer != OK]

    @property
    def ready(self) -> bool:
        return not self.failed


def check_database(sessions: sessionmaker[Session]) -> str:
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        cause = getattr(error, "orig", None) or error
        return f"the database is unreachable ({type(cause).__name__})"
    return OK


def check_broker(settings: Settings) -> str:
    """Redis answers PING; the file-system broker's folders exist and can be written."""
    url = settings.resolved_broker_url
    if url.startswith("filesystem://"):
        folder = settings.broker_dir
        if folder.is_dir() and os.access(folder, os.W_OK):
            return OK
        return f"the file-system broker's folder {folder} is missing or not writable"
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=CHECK_TIMEOUT_SECONDS,
                                      socket_connect_timeout=CHECK_TIMEOUT_SECONDS)
        try:
            client.ping()
        except redis.RedisError as error:
            return f"the broker (Redis) is unreachable ({type(error).__name__})"
        finally:
            client.close()
        return OK
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=CHECK_TIMEOUT_SECONDS) as connection:
            connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_SECONDS)
    except Exception as error:  # kombu raises the transport's own errors
        return f"the broker is unreachable ({type(error).__name__})"
    return OK


def check_storage(storage: Storage) -> str:
    """The media folder exists and can be written, or the bucket answers a HEAD request."""
    if isinstance(storage, LocalStorage):
        root: Path = storage.root
        if root.is_dir() and os.access(root, os.W_OK):
            return OK
        return f"the media folder {root} is missing or not writable"
    try:
        storage.exists(PROBE_KEY)
    except Exception as error:  # botocore and the storage wrapper raise many kinds
        return f"the storage is unreachable ({type(error).__name__})"
    return OK


def check_gpu_worker(sessions: sessionmaker[Session], settings: Settings) -> str:
    """At least one worker that consumes the gpu queue sent a heartbeat within ``worker_lost_seconds``."""
    since = utcnow() - timedelta(seconds=settings.worker_lost_seconds)
    try:
        with sessions() as session:
            queues = session.scalars(select(WorkerHeartbeat.queues).where(WorkerHeartbeat.last_seen_at >= since))
            if any(GPU_QUEUE in (each or []) for each in queues):
                return OK
    except SQLAlchemyError:
        return "no worker could be looked up: the database is unreachable"
    return f"no GPU worker sent a heartbeat in the last {settings.worker_lost_seconds} s"


def readiness(settings: Settings, sessions: sessionmaker[Session], storage: Storage) -> Readiness:
    checks: dict[str, Callable[[], str]] = {
        "database": lambda: check_database(sessions),
        "broker": lambda: check_broker(settings),
        "storage": lambda: check_storage(storage),
        "gpu_worker": lambda: check_gpu_worker(sessions, settings),
    }
    return Readiness({name: check() for name, check in checks.items()})
