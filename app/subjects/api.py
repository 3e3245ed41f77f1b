"""The studio JSON API: create a studio (multipart), list mine, one studio in detail, a photo, the style packs."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.deps import (
    ApiUser,
    SessionDep,
    SettingsDep,
    StorageDep,
    get_api_user_briefly,
    require_csrf,
    require_csrf_briefly,
    run_as_api_user,
)
from app.galleries.files import photo_response
from app.models import SUBJECT_KINDS, Job, Photo, Subject, User
from app.subjects import base_models, repository, retention, service
from app.subjects.forms import UploadDep, decode_slots, read_studio_upload
from app.subjects.schemas import (
    DEFAULT_IMAGES_PER_PROMPT,
    DEFAULT_QUALITY,
    QUALITY_PRESETS,
    BaseModelInfo,
    BaseModelOut,
    JobSummary,
    PhotoOut,
    StudioCreated,
    StylePackOut,
    SubjectCounts,
    SubjectDetail,
    SubjectList,
    SubjectSummary,
    SubjectUpdate,
)
from app.subjects.service import MAX_PROMPT_LENGTH
from worker.engine.prompts import STYLE_PACKS

router = APIRouter(prefix="/api/v1", tags=["subjects"])

# The creation body is parsed by hand (explicit limits, every problem reported at once), so FastAPI
# cannot derive its schema; this describes it for the OpenAPI document.
CREATE_STUDIO_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name", "kind", "consent", "photos"],
                "properties": {
                    "name": {"type": "string", "maxLength": 100, "description": "The studio's name, e.g. Rex."},
                    "kind": {"type": "string", "enum": list(SUBJECT_KINDS)},
                    "class_noun": {
                        "type": "string",
                        "description": "animal: what animal (letters and spaces, ≤ 30); person: man, woman or "
                        "person (default person); ignored for dog and cat.",
                    },
                    "style_pack": {
                        "type": "string",
                        "description": "A name from GET /api/v1/style-packs fitting the kind; default: the kind's.",
                    },
                    "prompts": {
                        "type": "array",
                        "items": {"type": "string", "maxLength": MAX_PROMPT_LENGTH},
                        "description": "Extra prompts, repeated and/or one per line; {subject} marks the subject.",
                    },
                    "images_per_prompt": {"type": "integer", "minimum": 1, "default": DEFAULT_IMAGES_PER_PROMPT},
                    "quality": {"type": "string", "enum": list(QUALITY_PRESETS), "default": DEFAULT_QUALITY},
                    "base_model": {
                        "type": "string",
                        "description": "A key from GET /api/v1/base-models; default: the first one there.",
                    },
                    "consent": {
                        "type": "string",
                        "enum": ["yes", "true", "on", "1"],
                        "description": "I am this person, or this is my pet / I have their permission.",
                    },
                    "photos": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "JPEG, PNG, WebP or HEIC photos (3–20 by default).",
                    },
                },
            }
        }
    },
}


def api_photo_url(photo: Photo) -> str:
    return f"/api/v1/subjects/{photo.subject_id}/photos/{photo.id}"


def job_summary(job: Job) -> JobSummary:
    return JobSummary(
        id=job.id,
        kind=job.kind,
        status=job.status,
        stage=job.stage,
        step=job.step,
        total=job.total,
        failure_reason=job.failure_reason,
        created_at=job.created_at,
        finished_at=job.finished_at,
        url=f"/api/v1/jobs/{job.id}",
    )


def subject_summary(card: service.StudioCard) -> SubjectSummary:
    subject = card.subject
    return SubjectSummary(
        id=subject.id,
        name=subject.name,
        kind=subject.kind,
        class_noun=subject.class_noun,
        status=card.status,
        thumbnail_url=(api_photo_url(card.thumbnail) if card.thumbnail is not None
                       else f"/api/v1/images/{card.cover_image.id}/file" if card.cover_image is not None else None),
        created_at=subject.created_at,
        expires_at=subject.expires_at,
        url=f"/api/v1/subjects/{subject.id}",
        page_url=f"/studios/{subject.id}",
    )


def base_model_info(subject: Subject, job: Job | None = None) -> BaseModelInfo | None:
    """The studio's base model (name, family, licence); ``job``'s details tell the family before publishing."""
    facts = base_models.model_facts(subject, job.details if job is not None else None)
    return BaseModelInfo(**facts.as_json()) if facts is not None else None


def subject_detail(session: Session, subject: Subject) -> SubjectDetail:
    """Everything about one studio (the caller found ``subject`` through an owner-scoped query)."""
    photos = [] if subject.photos_deleted_at else repository.photos_of(session, subject)
    latest_job = repository.latest_jobs(session, [subject.id]).get(subject.id)
    card = service.StudioCard(
        subject=subject,
        status=service.subject_status(subject, latest_job),
        thumbnail=photos[0] if photos else None,
        latest_job=latest_job,
        cover_image=None if photos else repository.best_images(session, [subject.id]).get(subject.id),
    )
    return SubjectDetail(
        **subject_summary(card).model_dump(),
        style_pack=subject.style_pack,
        prompts=list(subject.prompts),
        images_per_prompt=subject.images_per_prompt,
        quality=subject.quality,
        identifier=subject.identifier,
        base_model=subject.base_model,
        base_model_info=base_model_info(subject, latest_job),
        consent_at=subject.consent_at,
        photos_deleted_at=subject.photos_deleted_at,
        photos=[
            PhotoOut(
                id=photo.id,
                position=photo.position,
                original_name=photo.original_name,
                width=photo.width,
                height=photo.height,
                url=api_photo_url(photo),
            )
            for photo in photos
        ],
        latest_job=job_summary(latest_job) if latest_job is not None else None,
        counts=SubjectCounts(
            photos=len(photos),
            images=repository.count_images(session, subject.id),
            jobs=repository.count_jobs(session, subject.id),
        ),
    )


def owned_subject(session: Session, owner_id: uuid.UUID, subject_id: uuid.UUID) -> Subject:
    subject = repository.get_for_owner(session, owner_id, subject_id)
    if subject is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such studio.")
    return subject


@router.post(
    "/subjects",
    status_code=status.HTTP_201_CREATED,
    response_model=StudioCreated,
    # Who is asking first (no parsing for strangers), then the upload with the studio's limits, then
    # the CSRF check, which reads that same cached parse. No session is held while the body arrives.
    dependencies=[Depends(get_api_user_briefly), Depends(read_studio_upload), Depends(require_csrf_briefly)],
    openapi_extra={"requestBody": CREATE_STUDIO_BODY},
    responses={
        413: {"description": "More photos, or a bigger request, than allowed"},
        422: {"description": "Problems: {detail, fields: {name: reason}, files: [{name, reason}]}"},
        429: {"description": "Too many studios in training, or created in the last hour; see Retry-After"},
        403: {"description": "The operator requires a confirmed email address before training"},
    },
)
async def create_subject(request: Request, upload: UploadDep, storage: StorageDep, settings: SettingsDep) -> Response:
    """Create a studio from multipart fields (name, kind, class_noun, style_pack, prompts (repeated or one
    per line), images_per_prompt, quality, base_model, consent) and 3–20 ``photos`` files; training is queued."""

    def create(session: Session, user: User) -> StudioCreated:
        subject, job = service.store_studio(session, storage, settings, user, checked)
        return StudioCreated(subject=subject_detail(session, subject), job=job_summary(job))

    try:
        # Three steps, no database session held across the long one: the owner's limits (nothing is
        # decoded for an owner who may not start a studio now), the fields and photos (decoded in the
        # process's decode slots, off the event loop), then the rows and files, in a session opened
        # only now.
        await run_as_api_user(request, lambda session, user: service.raise_if_limited(session, user, settings))
        checked = await service.check_studio_in_slots(upload.form, upload.files, settings, decode_slots(request))
        created = await run_as_api_user(request, create)
    except service.StudioLimitReached as error:
        return JSONResponse({"detail": str(error)}, status_code=error.status_code, headers=error.headers)
    except service.StudioRejected as error:
        code = status.HTTP_413_CONTENT_TOO_LARGE if error.too_large else status.HTTP_422_UNPROCESSABLE_CONTENT
        return JSONResponse(error.problems.as_json(), status_code=code)
    return JSONResponse(
        created.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED,
        headers={"Location": created.subject.url},
    )


@router.get("/subjects", response_model=SubjectList)
def list_subjects(user: ApiUser, session: SessionDep) -> SubjectList:
    """My studios, newest first, with status, thumbnail URL and expiry date."""
    return SubjectList(subjects=[subject_summary(card) for card in service.studio_cards(session, user)])


@router.get("/subjects/{subject_id:uuid}", response_model=SubjectDetail)
def get_subject(subject_id: uuid.UUID, user: ApiUser, session: SessionDep) -> SubjectDetail:
    """One studio: its settings, photos, latest job and counts."""
    return subject_detail(session, owned_subject(session, user.id, subject_id))


@router.patch("/subjects/{subject_id:uuid}", response_model=SubjectDetail, dependencies=[Depends(require_csrf)])
def update_subject(subject_id: uuid.UUID, update: SubjectUpdate, user: ApiUser, session: SessionDep) -> SubjectDetail:
    """Rename the studio (``{"name": "Rex"}``); its pictures' captions and file names follow the new name."""
    subject = owned_subject(session, user.id, subject_id)
    try:
        service.rename_subject(session, subject, update.name)
    except service.InvalidName as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from None
    return subject_detail(session, subject)


@router.post("/subjects/{subject_id:uuid}/renew", response_model=SubjectDetail, dependencies=[Depends(require_csrf)])
def renew_subject(subject_id: uuid.UUID, user: ApiUser, session: SessionDep, settings: SettingsDep) -> SubjectDetail:
    """Keep the studio for another ``retention_days`` from now (its new ``expires_at`` is in the answer)."""
    subject = owned_subject(session, user.id, subject_id)
    retention.renew(session, subject, settings)
    return subject_detail(session, subject)


@router.post(
    "/subjects/{subject_id:uuid}/retry",
    status_code=status.HTTP_201_CREATED,
    response_model=StudioCreated,
    dependencies=[Depends(require_csrf)],
    responses={
        409: {"description": "Not a failed or cancelled studio, already trained, or its photos are gone"},
        429: {"description": "Too many studios in training; see Retry-After"},
        403: {"description": "The operator requires a confirmed email address before training"},
    },
)
def retry_subject(subject_id: uuid.UUID, user: ApiUser, session: SessionDep, settings: SettingsDep) -> Response:
    """"Try again": a new training job of a studio whose training failed or was cancelled, from its kept photos."""
    subject = owned_subject(session, user.id, subject_id)
    try:
        job = service.retry_studio(session, settings, user, subject)
    except service.RetryRefused as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    except service.StudioLimitReached as error:
        return JSONResponse({"detail": str(error)}, status_code=error.status_code, headers=error.headers)
    created = StudioCreated(subject=subject_detail(session, subject), job=job_summary(job))
    return JSONResponse(created.model_dump(mode="json"), status_code=status.HTTP_201_CREATED,
                        headers={"Location": job_summary(job).url})


@router.get("/subjects/{subject_id:uuid}/photos/{photo_id:uuid}", response_class=Response)
def get_photo(
    subject_id: uuid.UUID,
    photo_id: uuid.UUID,
    user: ApiUser,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    """One uploaded photo as stored (sanitized JPEG): streamed, or a redirect to a short-lived signed URL."""
    return photo_response(session, storage, settings, user.id, subject_id, photo_id)


@router.get("/style-packs", response_model=list[StylePackOut])
def list_style_packs() -> list[StylePackOut]:
    """Every style pack: its name (the ``style_pack`` field), title, subject kind ("pet" or "person"), prompts."""
    return [
        StylePackOut(name=pack.name, title=pack.title, kind=pack.kind, prompts=list(pack.prompts), shape=pack.shape,
                     sample_url=service.pack_sample_url(pack.name))
        for pack in STYLE_PACKS.values()
    ]


@router.get("/base-models", response_model=list[BaseModelOut])
def list_base_models(settings: SettingsDep) -> list[BaseModelOut]:
    """The base models a studio can be trained on (the ``base_model`` field), the default first, each
    with its licence. The family (SD 1.x/2.x, SDXL, ...) is known once a worker has loaded it: see a
    studio's ``base_model_info``."""
    offers = base_models.offered(settings)
    return [
        BaseModelOut(key=offer.key, name=offer.name, licence=offer.licence, licence_url=offer.licence_url,
                     default=index == 0)
        for index, offer in enumerate(offers)
    ]
