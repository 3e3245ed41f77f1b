"""Fixtures for the studio tests: a recorder in place of the broker, and a valid creation request."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests import face_photos
from tests.app import photo_factory


@dataclass(frozen=True)
class SentTask:
    name: str
    kwargs: dict[str, str]
    queue: str


@pytest.fixture
def sent_tasks() -> Iterator[list[SentTask]]:
    """The tasks app.queue sends (after commit), recorded instead of going to a broker."""
    from app import queue

    sent: list[SentTask] = []
    queue.set_sender(lambda name, kwargs, queue_name: sent.append(SentTask(name, kwargs, queue_name)))
    yield sent
    queue.set_sender(None)


@pytest.fixture(scope="session")
def valid_photos() -> list[tuple[str, bytes]]:
    """Three distinct, sharp JPEGs: the smallest valid upload (made once; they are immutable bytes)."""
    return photo_factory.make_photos(3)


@pytest.fixture(scope="session")
def person_photos() -> list[tuple[str, bytes]]:
    """Three photos of one real person (Grace Hopper), different enough to pass as three shots."""
    return face_photos.person_uploads(3)


# The loopback S3 server and a bucket per test, for the studio tests that run on S3 storage.
from tests.app.storage.conftest import s3_client, s3_endpoint, s3_settings, s3_storage  # noqa: E402, F401
