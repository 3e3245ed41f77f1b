"""Fixtures for the gallery tests: the tasks the queue sends after a commit, captured instead of reaching a broker.

The ``db`` and ``app_storage`` fixtures come from tests/app/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app import queue

SentTasks = list[tuple[str, dict[str, str]]]


@pytest.fixture
def sent_tasks() -> Iterator[SentTasks]:
    """(task name, ids) of every task sent after a commit, in order."""
    sent: SentTasks = []
    queue.set_sender(lambda name, kwargs, queue_name: sent.append((name, kwargs)))
    yield sent
    queue.set_sender(None)
