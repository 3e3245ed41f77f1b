"""Shared fixtures: settings pointing at a temporary var/, a database built by the migrations
(SQLite, or PostgreSQL with ``--db postgres`` / STUDIO_TEST_DB=postgres), storage, and a mailbox (a
real SMTP server on loopback, tests/mailbox.py).

Each PostgreSQL test session works in a database of its own, created and dropped here, so
parallel runs never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from app import config as config_module
from app import db as db_module
from app import storage as storage_module
from app.config import Settings
from app.db import make_engine
from app.storage import LocalStorage
from tests.mailbox import Mailbox
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("STUDIO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        choices=["sqlite", "postgres"],
        default=os.environ.get("STUDIO_TEST_DB", "sqlite"),
        help="database backend the tests run against (default sqlite; STUDIO_TEST_DB sets it too)",
    )


def run_migrations(url: str) -> None:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "head")


@pytest.fixture(scope="session")
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database with the schema built by running the migrations."""
    if request.config.getoption("--db") == "postgres":
        name = f"studio_test_{uuid.uuid4().hex[:12]}"
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        run_migrations(url)
        yield url
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'studio.db'}"
        run_migrations(url)
        yield url


@pytest.fixture(scope="session")
def db_engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clean_db(db_engine: Engine) -> Iterator[Engine]:
    """The session-wide database, emptied after the test (the schema stays)."""
    yield db_engine
    from app.models import Base

    with db_engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def settings(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings for a test: a temporary var/, the test database, and every cached global reset."""
    values = Settings(
        environment="test",
        var_dir=tmp_path / "var",
        database_url=database_url,
        secret_key="test-secret-key-0123456789abcdef0123456789",
    )
    values.var_dir.mkdir(parents=True, exist_ok=True)
    caches = (config_module.get_settings, db_module.get_engine, db_module.get_sessionmaker, storage_module.get_storage)
    reset_caches(caches)
    monkeypatch.setattr(config_module, "get_settings", lambda: values)
    monkeypatch.setattr(db_module, "get_settings", lambda: values)
    monkeypatch.setattr(storage_module, "get_settings", lambda: values)
    yield values
    reset_caches(caches)


def reset_caches(caches: tuple[Any, ...]) -> None:
    """Forget the cached settings, engine and storage; the engine's pooled connections are closed first
    (left to the garbage collector, a suite's worth of engines would exhaust PostgreSQL's connections)."""
    if db_module.get_engine.cache_info().currsize:
        db_module.get_engine().dispose()
    for cached in caches:
        cached.cache_clear()


@pytest.fixture
def db_session(settings: Settings, clean_db: Engine) -> Iterator[Session]:
    """A session on the test database; the test decides when to commit. Rows are removed afterwards."""
    session = sessionmaker(bind=clean_db, expire_on_commit=False)()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.resolved_media_dir)


@pytest.fixture
def mailbox(settings: Settings) -> Iterator[Mailbox]:
    """A real SMTP server on loopback that the test's settings send to (plain SMTP, no TLS), with the
    app's tasks recorded instead of sent to a broker; ``mailbox.wait_for(n)`` delivers the mail
    (tests/mailbox.py)."""
    from app import queue

    box = Mailbox(free_port())
    box.start()
    settings.smtp_host, settings.smtp_port, settings.smtp_tls = "127.0.0.1", box.port, "none"
    settings.mail_from = "Studio <studio@example.org>"
    queue.set_sender(box.record)
    yield box
    queue.set_sender(None)
    box.stop()
