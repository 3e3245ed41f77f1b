"""Retention: expiry at creation + retention_days, renewal, and the periodic sweep."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import queue
from app.config import Settings
from app.models import Photo, Subject, utcnow
from app.storage import LocalStorage
from app.storage.base import subject_prefix
from app.subjects.retention import enforce_retention, expiry_for, renew
from tests.worker.factories import make_job, make_subject, make_user


@pytest.fixture(autouse=True)
def no_broker() -> Iterator[None]:
    queue.set_sender(lambda *args: None)
    yield
    queue.set_sender(None)


def test_expiry_is_retention_days_after_creation(settings: Settings) -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    assert expiry_for(created, settings) == created + timedelta(days=settings.retention_days)
    with pytest.raises(ValueError, match="timezone-aware"):
        expiry_for(datetime(2026, 1, 1), settings)
    with pytest.raises(ValueError, match="retention_days"):
        expiry_for(created, settings.model_copy(update={"retention_days": 0}))


def test_renew_pushes_the_expiry(db_session: Session, storage: LocalStorage, settings: Settings) -> None:
    subject = make_subject(db_session, storage, make_user(db_session), photos=1, expires_at=utcnow() + timedelta(1))
    now = utcnow()
    assert renew(db_session, subject, settings, now=now) == now + timedelta(days=settings.retention_days)
    db_session.commit()
    db_session.expire_all()
    renewed = db_session.get(Subject, subject.id)
    assert renewed is not None and renewed.expires_at == now + timedelta(days=settings.retention_days)


def test_the_sweep_deletes_expired_studios_and_photos_after_training(db_session: Session, storage: LocalStorage,
                                                                     settings: Settings) -> None:
    owner = make_user(db_session)
    expired = make_subject(db_session, storage, owner, photos=2, expires_at=utcnow() - timedelta(minutes=1))
    trained = make_subject(db_session, storage, owner, photos=2)
    make_job(db_session, trained, status="done")
    untrained = make_subject(db_session, storage, owner, photos=2)
    make_job(db_session, untrained, status="running")
    db_session.commit()

    report = enforce_retention(db_session, storage, settings)
    db_session.commit()

    assert report.expired_subjects == [str(expired.id)] and report.photo_sets_removed == [str(trained.id)]
    assert db_session.get(Subject, expired.id) is None
    assert storage.list(subject_prefix(owner.id, expired.id)) == []
    assert storage.list(subject_prefix(owner.id, trained.id) + "photos/") == []
    db_session.expire_all()
    kept = db_session.get(Subject, trained.id)
    assert kept is not None and kept.photos_deleted_at is not None
    assert db_session.execute(select(Photo).where(Photo.subject_id == trained.id)).first() is None
    assert len(storage.list(subject_prefix(owner.id, untrained.id) + "photos/")) == 2
    # Nothing left to do on the next pass.
    again = enforce_retention(db_session, storage, settings)
    assert again.expired_subjects == [] and again.photo_sets_removed == []


def test_photos_stay_when_the_operator_keeps_them(db_session: Session, storage: LocalStorage,
                                                  settings: Settings) -> None:
    trained = make_subject(db_session, storage, make_user(db_session), photos=2)
    make_job(db_session, trained, status="done")
    db_session.commit()
    keep = settings.model_copy(update={"delete_photos_after_training": False})
    assert enforce_retention(db_session, storage, keep).photo_sets_removed == []
    assert len(storage.list(subject_prefix(trained.owner_id, trained.id) + "photos/")) == 2
