"""Requests that wait do not stall the others.

- A burst of requests larger than the connection pool is served, not deadlocked: sync handlers run
  in a thread pool and keep their connection across thread hops until the session dependency
  commits; without a bound on sessions in flight, threads waiting for a connection starve the
  requests that hold one (see app.deps.get_db_session).
- A photo upload whose body is still arriving holds no session: with a single session slot, other
  requests are answered while it trickles in (see app.deps.get_auth_briefly).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from app.config import Settings
from app.main import create_app
from tests.app.serving import serving

CREDENTIALS = {"email": "burst@example.com", "password": "correct horse battery"}


@contextmanager
def serving_with_one_connection(settings: Settings) -> Iterator[str]:
    """The app under a real uvicorn on loopback, with only one connection in the pool and one spare."""
    tiny_pool = settings.model_copy(update={"database_pool_size": 1, "database_max_overflow": 1})
    with serving(create_app(tiny_pool)) as url:
        yield url


def bearer_token(url: str) -> str:
    assert httpx.post(f"{url}/api/v1/auth/signup", json=CREDENTIALS).status_code == 201
    token: str = httpx.post(f"{url}/api/v1/auth/token", json=CREDENTIALS).json()["token"]
    return token


def test_a_burst_bigger_than_the_pool_is_served(settings: Settings, clean_db: Engine) -> None:
    with serving_with_one_connection(settings) as url:
        token = bearer_token(url)

        async def burst() -> list[int]:
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=15) as client:
                responses = await asyncio.gather(*(client.get(f"{url}/api/v1/me") for _ in range(60)))
            return [response.status_code for response in responses]

        assert asyncio.run(burst()) == [200] * 60


def test_a_slow_upload_holds_no_session_while_its_body_arrives(settings: Settings, clean_db: Engine) -> None:
    with serving_with_one_connection(settings) as url:
        token = bearer_token(url)
        port = int(url.rsplit(":", 1)[1])
        boundary = "studio-test-boundary"
        first_part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nRex\r\n"
                      f"--{boundary}\r\nContent-Disposition: form-data; name=\"photos\"; filename=\"a.jpg\"\r\n"
                      "Content-Type: image/jpeg\r\n\r\n").encode()
        head = (f"POST /api/v1/subjects HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {10 * 1024 * 1024}\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port)) as upload:
            # A phone on a slow line: the headers and the start of the body, and the rest not yet.
            upload.sendall(head.encode() + first_part + b"\xff\xd8" + b"\x00" * 4096)
            time.sleep(0.5)  # the server has authenticated the upload and is waiting for its body
            started = time.monotonic()
            other = httpx.get(f"{url}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert other.status_code == 200
            assert time.monotonic() - started < 5, "another request waited for the upload's session"


def test_photos_decode_in_slots_of_their_own_not_in_a_session(
    settings: Settings, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two uploads decode while the process has one session slot: other requests are still answered,
    and no more photos decode at once than ``upload_decode_concurrency`` allows."""
    from app.photos import sanitize
    from tests.app.photo_factory import make_photos

    real_sanitize = sanitize.sanitize_upload
    entered = threading.Event()
    release = threading.Event()
    lock = threading.Lock()
    decoding = [0, 0]  # now, most at once

    def slow_sanitize(*args: Any, **kwargs: Any) -> Any:
        with lock:
            decoding[0] += 1
            decoding[1] = max(decoding[1], decoding[0])
        entered.set()
        try:
            assert release.wait(30), "the test never released the decoders"
            return real_sanitize(*args, **kwargs)
        finally:
            with lock:
                decoding[0] -= 1

    monkeypatch.setattr(sanitize, "sanitize_upload", slow_sanitize)
    one_decoder = settings.model_copy(update={"upload_decode_concurrency": 1, "max_active_jobs_per_user": 5})
    with serving_with_one_connection(one_decoder) as url:
        headers = {"Authorization": f"Bearer {bearer_token(url)}"}
        files = [("photos", (name, data, "image/jpeg")) for name, data in make_photos(3)]
        statuses: list[int] = []

        def upload(seed_name: str) -> None:
            form = {"name": seed_name, "kind": "dog", "consent": "yes"}
            statuses.append(httpx.post(f"{url}/api/v1/subjects", data=form, files=files, headers=headers,
                                       timeout=60).status_code)

        uploads = [threading.Thread(target=upload, args=(name,)) for name in ("Rex", "Bo")]
        for thread in uploads:
            thread.start()
        try:
            assert entered.wait(30), "no photo started decoding"
            started = time.monotonic()
            other = httpx.get(f"{url}/api/v1/me", headers=headers, timeout=10)
            assert other.status_code == 200
            assert time.monotonic() - started < 5, "another request waited for a decoding upload's session"
        finally:
            release.set()
            for thread in uploads:
                thread.join(60)
    assert decoding[1] == 1
    assert sorted(statuses) == [201, 201]  # near-duplicate photos across studios are fine
