"""A burst of requests larger than the connection pool is served, not deadlocked.

Sync handlers run in a thread pool and keep their connection across thread hops until the
session dependency commits; without a bound on sessions in flight, threads waiting for a
connection starve the requests that hold one (see app.deps.get_db_session).
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import uvicorn
from sqlalchemy import Engine

from app.config import Settings
from app.main import create_app
from tests.app.conftest import free_port


def test_a_burst_bigger_than_the_pool_is_served(settings: Settings, clean_db: Engine) -> None:
    tiny_pool = settings.model_copy(update={"database_pool_size": 1, "database_max_overflow": 1})
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_pool), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        credentials = {"email": "burst@example.com", "password": "correct horse battery"}
        assert httpx.post(f"{url}/api/v1/auth/signup", json=credentials).status_code == 201
        token = httpx.post(f"{url}/api/v1/auth/token", json=credentials).json()["token"]

        async def burst() -> list[int]:
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=15) as client:
                responses = await asyncio.gather(*(client.get(f"{url}/api/v1/me") for _ in range(60)))
            return [response.status_code for response in responses]

        assert asyncio.run(burst()) == [200] * 60
    finally:
        server.should_exit = True
        thread.join(timeout=10)
