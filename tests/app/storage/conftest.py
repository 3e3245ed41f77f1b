"""Storage backends for the behaviour tests: the local folder, and S3 against a real S3-protocol
server (moto in server mode on loopback), each test in a bucket of its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from app.config import Settings
from app.storage import LocalStorage, Storage
from app.storage.s3 import S3Storage

S3_REGION = "us-east-1"
S3_ACCESS_KEY = "test-access-key"
S3_SECRET_KEY = "test-secret-key"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3-protocol server on 127.0.0.1 at a free port, for the whole test session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_settings(settings: Settings, s3_endpoint: str) -> Settings:
    """The test settings pointed at a fresh, empty bucket on the loopback S3 server."""
    return settings.model_copy(
        update={
            "storage_backend": "s3",
            "s3_endpoint_url": s3_endpoint,
            "s3_bucket": f"studio-test-{uuid.uuid4().hex[:12]}",
            "s3_region": S3_REGION,
            "s3_access_key": S3_ACCESS_KEY,
            "s3_secret_key": S3_SECRET_KEY,
        }
    )


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    )


@pytest.fixture
def s3_storage(s3_settings: Settings, s3_client: Any) -> S3Storage:
    s3_client.create_bucket(Bucket=s3_settings.s3_bucket)
    return S3Storage.from_settings(s3_settings)


@pytest.fixture(params=["local", "s3"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """Each backend in turn: the same behaviour is expected from both."""
    if request.param == "local":
        return LocalStorage(tmp_path / "media")
    storage: S3Storage = request.getfixturevalue("s3_storage")
    return storage
