"""/readyz names every dependency that fails (the broker stopped, the database unreachable, no GPU worker);
/healthz stays a liveness check; /metrics is closed without its token."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.config import Settings
from app.main import create_app
from app.models import WorkerHeartbeat, utcnow
from tests.servers import PrivateRedis, free_port


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.remove()


def beat(engine: Engine, queues: list[str], seconds_ago: float = 0) -> None:
    with Session(engine) as session:
        session.add(WorkerHeartbeat(name=f"box:{len(queues)}{int(seconds_ago)}", host="box", pid=1, queues=queues,
                                    last_seen_at=utcnow() - timedelta(seconds=seconds_ago)))
        session.commit()


def readyz(settings: Settings) -> tuple[int, dict[str, object]]:
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    return response.status_code, response.json()


def test_readyz_names_each_failing_dependency(settings: Settings, clean_db: Engine,
                                              redis_server: PrivateRedis) -> None:
    ready_settings = settings.model_copy(update={"broker_url": redis_server.url})

    # No worker at all, then only a CPU worker and a GPU worker lost long ago: not ready, for that reason only.
    status, body = readyz(ready_settings)
    assert (status, body["failed"]) == (503, ["gpu_worker"])
    beat(clean_db, ["cpu"])
    beat(clean_db, ["gpu"], seconds_ago=3600)
    status, body = readyz(ready_settings)
    assert (status, body["failed"]) == (503, ["gpu_worker"])
    assert "no GPU worker sent a heartbeat" in str(body["checks"])

    beat(clean_db, ["cpu", "gpu"])
    status, body = readyz(ready_settings)
    assert (status, body) == (200, {"status": "ready", "failed": [], "checks": dict.fromkeys(
        ["database", "broker", "storage", "gpu_worker"], "ok")})

    # The broker stops: only the broker fails.
    redis_server.stop()
    status, body = readyz(ready_settings)
    assert (status, body["failed"]) == (503, ["broker"])
    assert "Redis" in str(body["checks"])

    # The database is unreachable: the database fails, and no worker can be looked up.
    gone = ready_settings.model_copy(update={
        "database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere"})
    status, body = readyz(gone)
    assert status == 503 and {"database", "gpu_worker"} <= set(body["failed"])  # type: ignore[arg-type]


def test_healthz_stays_liveness_and_metrics_needs_its_token(settings: Settings, clean_db: Engine) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}  # no worker needed
        assert client.get("/metrics").status_code == 404  # no token configured: no /metrics
    with TestClient(create_app(settings.model_copy(update={"metrics_token": "s3cret-metrics"}))) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client.get("/studios/new")  # a request whose latency is measured under its route
        scraped = client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics"})
        assert scraped.status_code == 200
        assert 'studio_http_request_duration_seconds_count{method="GET",route="/studios/new"} 1.0' in scraped.text
        assert 'studio_queue_length{queue="gpu"} 0.0' in scraped.text
        assert 'studio_jobs{state="queued"} 0.0' in scraped.text


def test_metrics_count_the_brokers_messages_per_queue(settings: Settings, clean_db: Engine,
                                                      redis_server: PrivateRedis,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from app import config as config_module

    values = settings.model_copy(update={"broker_url": redis_server.url, "metrics_token": "t" * 20})
    monkeypatch.setattr(config_module, "get_settings", lambda: values)
    client = redis.Redis.from_url(redis_server.url)
    client.lpush("cpu", "a", "b")
    client.lpush("gpu\x06\x163", "c")  # a message of priority 3 lives in a list of its own
    client.close()
    with TestClient(create_app(values)) as web:
        text = web.get("/metrics", headers={"Authorization": "Bearer " + "t" * 20}).text
    assert 'studio_broker_queue_messages{queue="cpu"} 2.0' in text
    assert 'studio_broker_queue_messages{queue="gpu"} 1.0' in text
