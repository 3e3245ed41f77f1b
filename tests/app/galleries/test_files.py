"""Answers with stored files: streamed or redirected, safe headers, and the ZIP as a streaming response."""

from __future__ import annotations

import pytest
from fastapi import HTTPException
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy.orm import Session

from app.config import Settings
from app.galleries.files import content_disposition, file_response, zip_response
from app.storage import LocalStorage
from tests.app.factories import make_image, make_job, make_subject, make_user


def test_content_disposition_keeps_quotes_out_and_names_non_ascii_files() -> None:
    header = content_disposition("attachment", 'zoë "the dog".png')
    assert header == "attachment; filename=\"zo the dog.png\"; filename*=UTF-8''zo%C3%AB%20%22the%20dog%22.png"


def test_file_response_streams_and_404s(storage: LocalStorage, settings: Settings) -> None:
    storage.put_bytes("users/a/b.png", b"png-bytes")
    response = file_response(storage, settings, "users/a/b.png", "image/png", "b.png", "attachment")
    assert isinstance(response, StreamingResponse)
    assert response.headers["content-disposition"].startswith('attachment; filename="b.png"')
    assert response.headers["x-content-type-options"] == "nosniff"
    with pytest.raises(HTTPException) as missing:
        file_response(storage, settings, "users/a/gone.png", "image/png", "gone.png")
    assert missing.value.status_code == 404


def test_file_response_redirects_to_a_signed_url(storage: LocalStorage, settings: Settings,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, int, str | None]] = []

    def presigned(key: str, seconds: int, filename: str | None = None) -> str:
        asked.append((key, seconds, filename))
        return "https://bucket.example/signed"

    monkeypatch.setattr(storage, "presigned_url", presigned)
    response = file_response(storage, settings, "users/a/b.png", "image/png", "b.png", "attachment")
    assert isinstance(response, RedirectResponse)
    assert response.status_code == 307
    assert asked == [("users/a/b.png", settings.signed_url_seconds, "b.png")]


def test_zip_response_is_a_streaming_response(db_session: Session, storage: LocalStorage) -> None:
    subject = make_subject(db_session, make_user(db_session), name="Zoë")
    image = make_image(db_session, storage, subject, make_job(db_session, subject))
    response = zip_response(storage, subject, [image])
    assert isinstance(response, StreamingResponse)
    assert response.media_type == "application/zip"
    assert "content-length" not in response.headers
    assert response.headers["content-disposition"].startswith('attachment; filename="zoe-gallery.zip"')
