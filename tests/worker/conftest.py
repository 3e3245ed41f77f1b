"""Fixtures for pipeline tests: worker settings, a worker context on the test database, captured sends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from app import queue
from app.config import Settings
from app.storage import LocalStorage
from worker.settings import WorkerSettings, worker_settings_from
from worker.tasks.runtime import WorkerContext


@pytest.fixture
def worker_settings(settings: Settings) -> WorkerSettings:
    """Worker settings on the test var/ with quick heartbeats and unthrottled cancel checks and writes."""
    return worker_settings_from(settings).model_copy(update={
        "heartbeat_seconds": 1,
        "lease_seconds": 30,
        "cancel_poll_seconds": 0.0,
        "progress_write_seconds": 0.0,
    })


@pytest.fixture
def ctx(worker_settings: WorkerSettings, clean_db: Engine, storage: LocalStorage) -> WorkerContext:
    return WorkerContext(settings=worker_settings, storage=storage,
                         sessions=sessionmaker(bind=clean_db, expire_on_commit=False), worker_id="test-worker")


@pytest.fixture
def sent() -> Iterator[list[tuple[str, dict[str, str], str]]]:
    """Tasks sent through app.queue during the test, instead of a broker: (name, kwargs, queue)."""
    captured: list[tuple[str, dict[str, str], str]] = []
    queue.set_sender(lambda name, kwargs, queue_name: captured.append((name, kwargs, queue_name)))
    yield captured
    queue.set_sender(None)
