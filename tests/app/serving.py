"""``serving(app)``: an app under a real uvicorn on loopback, for tests that need real connections
(concurrent requests, forwarded headers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from tests.app.conftest import free_port


@contextmanager
def serving(app: FastAPI, **options: Any) -> Iterator[str]:
    """``app`` served on a free loopback port in a thread (``options`` go to uvicorn.Config); yields its URL."""
    settings = {"log_level": "warning", **options}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), **settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
