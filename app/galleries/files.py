"""Answering with a stored file: a redirect to a short-lived signed URL when the backend has one (S3),
else the bytes streamed chunk by chunk. Every file answered is one an owner-scoped query found."""

from __future__ import annotations

import uuid
from typing import Literal
from urllib.parse import quote

from fastapi import HTTPException, status
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.config import Settings
from app.galleries import model_export, service
from app.galleries.service import open_chunks
from app.models import GeneratedImage, Subject
from app.storage import ObjectNotFound, Storage
from app.subjects import repository as subject_repository

Disposition = Literal["inline", "attachment"]
# Generated images never change under a key, so a browser may keep them; "private": never a shared cache.
IMAGE_CACHE_CONTROL = "private, max-age=3600"


def content_disposition(disposition: Disposition, filename: str) -> str:
    """The header for ``filename``, with an RFC 5987 form for names that are not plain ASCII."""
    ascii_name = filename.encode("ascii", "ignore").decode("ascii").replace('"', "").replace("\\", "") or "download"
    return f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"


def file_response(
    storage: Storage,
    settings: Settings,
    key: str,
    media_type: str,
    filename: str,
    disposition: Disposition = "inline",
    cache_control: str = IMAGE_CACHE_CONTROL,
) -> Response:
    """A 307 to the backend's signed URL, or a streamed body; 404 when the object is gone."""
    signed = storage.presigned_url(key, settings.signed_url_seconds, filename if disposition == "attachment" else None)
    if signed:
        return RedirectResponse(signed, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    try:
        chunks = open_chunks(storage, key)
    except ObjectNotFound:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail="The file is no longer stored.") from None
    headers = {
        "Content-Disposition": content_disposition(disposition, filename),
        "Cache-Control": cache_control,
        "X-Content-Type-Options": "nosniff",
    }
    return StreamingResponse(chunks, media_type=media_type, headers=headers)


def photo_response(
    session: Session, storage: Storage, settings: Settings, owner_id: uuid.UUID, subject_id: uuid.UUID,
    photo_id: uuid.UUID,
) -> Response:
    """One of the owner's uploaded photos (the sanitized copy); 404 for another account's or a missing one."""
    photo = subject_repository.get_photo_for_owner(session, owner_id, subject_id, photo_id)
    if photo is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail="No such photo.")
    return file_response(storage, settings, photo.storage_key, "image/jpeg", f"photo-{photo.position + 1}.jpg")


def model_download_response(
    storage: Storage, settings: Settings, subject: Subject, variant: model_export.DownloadVariant
) -> Response:
    """One of the studio's model downloads (see app.galleries.model_export); 404 when there is none."""
    try:
        model = model_export.require_trained_model(subject)
        download = model.download(variant)
    except model_export.NoTrainedModel as error:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=str(error)) from None
    if download.storage_key is not None:
        return file_response(storage, settings, download.storage_key, "application/octet-stream", download.filename,
                             "attachment", cache_control="no-store")
    headers = {"Content-Disposition": content_disposition("attachment", download.filename), "Cache-Control": "no-store"}
    return StreamingResponse(model_export.iter_model_zip(storage, subject, model), media_type="application/zip",
                             headers=headers)


def zip_response(storage: Storage, subject: Subject, images: list[GeneratedImage]) -> StreamingResponse:
    """The gallery as a streamed ZIP. The entries are plain data made now: the database session is
    closed by the time the body streams."""
    entries = service.zip_entries(subject, images)
    body = service.iter_zip(storage, entries, service.zip_about(subject))
    headers = {
        "Content-Disposition": content_disposition("attachment", service.zip_filename(subject)),
        "Cache-Control": "no-store",
    }
    return StreamingResponse(body, media_type="application/zip", headers=headers)
