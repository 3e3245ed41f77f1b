"""Fixtures for the gallery web tests: a committed session to make rows with, and storage the app reads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.storage import Storage


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
