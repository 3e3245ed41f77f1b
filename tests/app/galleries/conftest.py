"""Fixtures for the gallery tests: a committed session to make rows with, the storage the app reads, and the
tasks the queue sends after a commit, captured instead of reaching a broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app import queue
from app.storage import Storage

SentTasks = list[tuple[str, dict[str, str]]]


@pytest.fixture
def db(clean_db: Engine) -> Iterator[Session]:
    """A session for arranging rows; the test commits so the app's own sessions see them."""
    session = sessionmaker(bind=clean_db, expire_on_commit=False)()
    yield session
    session.rollback()
    session.close()


@pytest.fixture
def app_storage(app: FastAPI) -> Storage:
    """The storage the app serves from."""
    storage: Storage = app.state.storage
    return storage


@pytest.fixture
def sent_tasks() -> Iterator[SentTasks]:
    """(task name, ids) of every task sent after a commit, in order."""
    sent: SentTasks = []
    queue.set_sender(lambda name, kwargs, queue_name: sent.append((name, kwargs)))
    yield sent
    queue.set_sender(None)
