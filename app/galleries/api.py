"""The gallery JSON API: list and read images, their files, favourites, "generate more", the ZIP, delete."""

from __future__ import annotations

import uuid
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.config import Settings
from app.deps import ApiUser, SessionDep, SettingsDep, StorageDep, require_csrf
from app.galleries import model_export, repository, service, sharing
from app.galleries.files import file_response, model_download_response, zip_response
from app.galleries.schemas import (
    FavouriteUpdate,
    GenerateAccepted,
    GenerateRequest,
    ImageGroup,
    ImageList,
    ImageOut,
    ModelDownloadOut,
    ShareCreate,
    ShareOut,
    TrainedModelOut,
)
from app.jobs import service as job_service
from app.models import ShareLink, Subject, User
from app.subjects import repository as subject_repository
from app.subjects.schemas import BaseModelInfo

router = APIRouter(prefix="/api/v1", tags=["galleries"])

SUBJECT_NOT_FOUND = "No such studio."
IMAGE_NOT_FOUND = "No such image."
ERROR_STATUS = {
    service.InvalidGenerationRequest: status.HTTP_422_UNPROCESSABLE_CONTENT,
    service.GenerationNotPossible: status.HTTP_409_CONFLICT,
    service.TooManyActiveJobs: status.HTTP_429_TOO_MANY_REQUESTS,
    service.MonthlyQuotaReached: status.HTTP_429_TOO_MANY_REQUESTS,
}


def owned_subject(session: Session, subject_id: uuid.UUID, user: User) -> Subject:
    subject = subject_repository.get_for_owner(session, user.id, subject_id)
    if subject is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, SUBJECT_NOT_FOUND)
    return subject


def gallery_error(error: service.GalleryError) -> HTTPException:
    """The HTTP answer to a refused request; a 429 says when to come back."""
    code = ERROR_STATUS.get(type(error), status.HTTP_400_BAD_REQUEST)
    too_many = code == status.HTTP_429_TOO_MANY_REQUESTS
    headers = {"Retry-After": str(getattr(error, "retry_after", service.RETRY_AFTER_SECONDS))} if too_many else None
    return HTTPException(code, str(error), headers=headers)


@router.get("/subjects/{subject_id:uuid}/images", response_model=ImageList)
def list_images(
    subject_id: uuid.UUID,
    user: ApiUser,
    session: SessionDep,
    grouped: bool = Query(False, description="also return the images grouped by prompt"),
    favourites: bool = Query(False, description="only the favourites"),
    sort: Literal["created", "likeness"] = Query("created", description="oldest first, or best likeness first"),
) -> ImageList:
    subject = owned_subject(session, subject_id, user)
    images = repository.images_of_subject(session, subject.id, user.id, favourites_only=favourites, sort=sort)
    groups = None
    if grouped:
        groups = [
            ImageGroup(
                prompt_template=group.template,
                readable_prompt=group.readable,
                images=[ImageOut.of(image) for image in group.images],
            )
            for group in service.group_by_prompt(subject, images)
        ]
    return ImageList(subject_id=subject.id, count=len(images), images=[ImageOut.of(i) for i in images], groups=groups)


@router.get("/images/{image_id:uuid}", response_model=ImageOut)
def get_image(image_id: uuid.UUID, user: ApiUser, session: SessionDep) -> ImageOut:
    image = repository.get_image(session, image_id, user.id)
    if image is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, IMAGE_NOT_FOUND)
    return ImageOut.of(image)


@router.get("/images/{image_id:uuid}/file", response_class=Response)
def get_image_file(
    image_id: uuid.UUID,
    user: ApiUser,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    download: bool = Query(False, description="answer as an attachment with a readable file name"),
) -> Response:
    """The PNG: streamed, or a 307 to a short-lived signed URL on S3."""
    found = repository.get_image_with_subject(session, image_id, user.id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, IMAGE_NOT_FOUND)
    image, subject = found
    if download:
        filename = service.download_filename(subject, image, repository.position_in_prompt(session, image))
        return file_response(storage, settings, image.storage_key, "image/png", filename, "attachment")
    # Inline (an <img> in a gallery of many): no position, so no extra query per picture.
    filename = service.download_filename(subject, image)
    return file_response(storage, settings, image.storage_key, "image/png", filename, "inline")


@router.patch("/images/{image_id:uuid}", response_model=ImageOut, dependencies=[Depends(require_csrf)])
def update_image(image_id: uuid.UUID, update: FavouriteUpdate, user: ApiUser, session: SessionDep) -> ImageOut:
    """Mark or unmark a favourite."""
    image = repository.get_image(session, image_id, user.id)
    if image is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, IMAGE_NOT_FOUND)
    service.set_favourite(session, image, update.favourite)
    return ImageOut.of(image)


@router.delete("/images/{image_id:uuid}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[Depends(require_csrf)])
def delete_image(image_id: uuid.UUID, user: ApiUser, session: SessionDep, storage: StorageDep) -> Response:
    """Delete one picture, its file with it; the studio's other pictures stay as they are."""
    image = repository.get_image(session, image_id, user.id)
    if image is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, IMAGE_NOT_FOUND)
    service.delete_image(session, storage, image)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/images/{image_id:uuid}/more",
    response_model=GenerateAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_csrf)],
)
def more_like_this(image_id: uuid.UUID, user: ApiUser, session: SessionDep, settings: SettingsDep) -> GenerateAccepted:
    """"More like this": new pictures of this picture's prompt with new seeds, as a "generate more" job
    (the same refusals: 409, 429)."""
    found = repository.get_image_with_subject(session, image_id, user.id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, IMAGE_NOT_FOUND)
    image, subject = found
    try:
        job = service.request_more_like(session, settings, subject, image)
    except service.GalleryError as error:
        raise gallery_error(error) from None
    return GenerateAccepted(job=job_service.job_status(session, job, subject.class_noun))


def share_out(settings: Settings, link: ShareLink) -> ShareOut:
    return ShareOut(id=link.id, url=sharing.share_url(settings, link), image_id=link.image_id,
                    created_at=link.created_at, expires_at=link.expires_at, revoked=link.revoked_at is not None)


@router.post("/subjects/{subject_id:uuid}/shares", response_model=ShareOut, status_code=status.HTTP_201_CREATED,
             dependencies=[Depends(require_csrf)])
def create_share(subject_id: uuid.UUID, body: ShareCreate, user: ApiUser, session: SessionDep,
                 settings: SettingsDep) -> ShareOut:
    """A share link of one picture (``image_id``) or of the whole gallery, for 1, 7 or 30 days. Nothing
    is shared before; anyone with the link sees the pictures until it expires or is revoked."""
    subject = owned_subject(session, subject_id, user)
    image = None
    if body.image_id is not None:
        image = repository.get_image(session, body.image_id, user.id)
        if image is None or image.subject_id != subject.id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, IMAGE_NOT_FOUND)
    return share_out(settings, sharing.create_share(session, subject, image, body.days))


@router.get("/subjects/{subject_id:uuid}/shares", response_model=list[ShareOut])
def list_shares(subject_id: uuid.UUID, user: ApiUser, session: SessionDep, settings: SettingsDep) -> list[ShareOut]:
    """The studio's share links that still work, newest first."""
    subject = owned_subject(session, subject_id, user)
    return [share_out(settings, link) for link in sharing.links_of(session, subject.id, user.id)]


@router.delete("/shares/{share_id:uuid}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[Depends(require_csrf)])
def revoke_share(share_id: uuid.UUID, user: ApiUser, session: SessionDep) -> Response:
    """Turn a share link off: from now on it shows nothing."""
    link = sharing.get_owned(session, share_id, user.id)
    if link is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such share link.")
    sharing.revoke(session, link)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/subjects/{subject_id:uuid}/generate",
    response_model=GenerateAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_csrf)],
)
def generate_more(
    subject_id: uuid.UUID, body: GenerateRequest, user: ApiUser, session: SessionDep, settings: SettingsDep
) -> GenerateAccepted:
    """New prompts on the trained model, without training again. 409 before training finished or while a job
    runs; 429 when the account has its maximum of active jobs. Poll the returned job like any other."""
    subject = owned_subject(session, subject_id, user)
    try:
        job = service.request_generation(session, settings, subject, body.prompts, body.images_per_prompt,
                                         body.shape)
    except service.GalleryError as error:
        raise gallery_error(error) from None
    return GenerateAccepted(job=job_service.job_status(session, job, subject.class_noun))


@router.get("/subjects/{subject_id:uuid}/download.zip", response_class=StreamingResponse)
def download_zip(
    subject_id: uuid.UUID,
    user: ApiUser,
    session: SessionDep,
    storage: StorageDep,
    favourites: bool = Query(False, description="only the favourites"),
) -> StreamingResponse:
    """Every image as "<prompt>/<n>.png" plus manifest.json (prompt, seed, scores), streamed as it is built."""
    subject = owned_subject(session, subject_id, user)
    images = repository.images_of_subject(session, subject.id, user.id, favourites_only=favourites)
    return zip_response(storage, subject, images)


@router.get("/subjects/{subject_id:uuid}/model", response_model=TrainedModelOut)
def get_trained_model(subject_id: uuid.UUID, user: ApiUser, session: SessionDep) -> TrainedModelOut:
    """The studio's trained model: what to load it on, the words that call up the subject, and its downloads."""
    subject = owned_subject(session, subject_id, user)
    try:
        model = model_export.require_trained_model(subject)
    except model_export.NoTrainedModel as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    base = f"/api/v1/subjects/{subject.id}/model"
    return TrainedModelOut(
        method=model.method, base_model=model.base_model, demo_model=model.demo_model, trigger=model.trigger,
        base_model_info=(BaseModelInfo(**model.base_model_info.as_json())
                         if model.base_model_info is not None else None),
        downloads=[ModelDownloadOut(variant=d.variant, label=d.label, filename=d.filename, url=f"{base}/{d.variant}")
                   for d in model.downloads],
    )


@router.get("/subjects/{subject_id:uuid}/model/{variant}", response_class=Response)
def download_trained_model(
    subject_id: uuid.UUID,
    variant: model_export.DownloadVariant,
    user: ApiUser,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    """The model file to use elsewhere: ``a1111`` and ``diffusers`` (LoRA studios), or ``zip`` (every weights file)."""
    return model_download_response(storage, settings, owned_subject(session, subject_id, user), variant)


@router.delete(
    "/subjects/{subject_id:uuid}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[Depends(require_csrf)]
)
def delete_studio(subject_id: uuid.UUID, user: ApiUser, session: SessionDep, storage: StorageDep) -> Response:
    """Delete the studio and everything in it: photos, model, images, jobs (running ones are cancelled)."""
    from app.subjects.deletion import delete_subject  # P1's module; imported here to keep start-up light

    delete_subject(session, storage, owned_subject(session, subject_id, user))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
