"""The migrated schema matches the ORM models, and timestamps come back timezone-aware."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.models import Base, Subject, User


def test_migrations_match_models(db_engine: Engine) -> None:
    with db_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_datetimes_round_trip_as_utc(db_session: Session) -> None:
    user = User(email="a@example.com", password_hash="x")
    db_session.add(user)
    db_session.flush()
    now = datetime.now(UTC)
    subject = Subject(
        owner_id=user.id, name="Rex", kind="dog", class_noun="dog", style_pack="pet-adventures",
        consent_at=now, expires_at=now + timedelta(days=30),
    )
    db_session.add(subject)
    db_session.commit()
    db_session.expire_all()
    loaded = db_session.scalars(select(Subject)).one()
    assert loaded.expires_at.tzinfo is not None
    assert abs(loaded.expires_at - (now + timedelta(days=30))) < timedelta(seconds=1)
