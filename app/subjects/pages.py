"""Studio pages: my studios, the "new studio" form and its post, and the owner's photo files."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.config import Settings
from app.deps import (
    Auth,
    PageUser,
    SessionDep,
    SettingsDep,
    StorageDep,
    get_page_user_briefly,
    page_user_of,
    require_csrf,
    require_csrf_briefly,
    run_in_request_session,
)
from app.galleries.files import photo_response
from app.jobs import estimates
from app.models import Subject
from app.photos.sanitize import format_megabytes
from app.subjects import base_models, repository, retention, service
from app.subjects.forms import StudioUpload, UploadDep, decode_slots, read_studio_upload
from app.subjects.schemas import (
    DEFAULT_IMAGES_PER_PROMPT,
    DEFAULT_QUALITY,
    PERSON_NOUNS,
    QUALITY_PRESETS,
    StudioProblems,
)
from app.templating import format_date, person_zone, redirect_with_flash, render
from worker.engine.prompts import DEFAULT_PACK, STYLE_PACKS, split_shape

router = APIRouter(include_in_schema=False)

STATUS_LABELS = {
    "new": "New",
    "queued": "In line",
    "running": "Training",
    "done": "Ready",
    "failed": "Failed",
    "cancelled": "Cancelled",
}
# The page's form sends the typed animal and the chosen person word in fields of their own, so both
# can be on the page at once (without script); the kind picks which one becomes the class noun.
ANIMAL_NOUN_FIELD = "class_noun_animal"
PERSON_NOUN_FIELD = "class_noun_person"


@dataclass(frozen=True)
class KindChoice:
    value: str
    title: str
    hint: str


KIND_CHOICES = (
    KindChoice("dog", "Dog", "Any breed"),
    KindChoice("cat", "Cat", "Any breed"),
    KindChoice("animal", "Another animal", "Rabbit, horse, parrot…"),
    KindChoice("person", "A person", "You, or someone who agreed"),
)


def form_values(values: dict[str, list[str]] | None = None, default_model: str = "") -> dict[str, Any]:
    """What the form's inputs show: the defaults, or what was sent (so a re-shown form keeps it)."""
    sent = values or {}

    def first(name: str, default: str = "") -> str:
        return (sent.get(name) or [default])[0]

    return {
        "name": first("name"),
        "kind": first("kind"),
        "class_noun_animal": first(ANIMAL_NOUN_FIELD),
        "class_noun_person": first(PERSON_NOUN_FIELD, "person"),
        "style_pack": first("style_pack"),
        "prompts": "\n".join(sent.get("prompts", [])),
        "images_per_prompt": first("images_per_prompt", str(DEFAULT_IMAGES_PER_PROMPT)),
        "quality": first("quality", DEFAULT_QUALITY),
        "consent": first("consent") in ("1", "true", "on", "yes"),
        "base_model": first("base_model", default_model),
    }


def new_studio_context(
    settings: Settings,
    values: dict[str, list[str]] | None = None,
    problems: StudioProblems | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """The "new studio" page's context: choices, limits, the values to show and any problems."""
    problems = problems or StudioProblems()
    field_errors = dict(problems.fields)
    if ANIMAL_NOUN_FIELD not in field_errors and "class_noun" in field_errors:
        field_errors[ANIMAL_NOUN_FIELD] = field_errors[PERSON_NOUN_FIELD] = field_errors["class_noun"]
    errors = [message] if message else problems.sentences()
    offers = base_models.offered(settings)
    return {
        "values": form_values(values, offers[0].key),
        # Only a real choice is shown: with one model the form is what it always was.
        "base_models": offers if len(offers) > 1 else [],
        "kinds": KIND_CHOICES,
        "person_nouns": PERSON_NOUNS,
        "packs": [
            {"name": pack.name, "title": pack.title, "kind": pack.kind, "shape": pack.shape,
             "prompts": [split_shape(prompt)[0] for prompt in pack.prompts],
             "sample_url": service.pack_sample_url(pack.name)}
            for pack in STYLE_PACKS.values()
        ],
        "default_packs": DEFAULT_PACK,
        "quality_presets": QUALITY_PRESETS,
        "limits": {
            "min_photos": settings.min_photos,
            "max_photos": settings.max_photos,
            "max_photo_bytes": settings.max_photo_bytes,
            "max_photo_size": format_megabytes(settings.max_photo_bytes),
            "max_prompts": settings.max_prompts,
            "max_prompt_length": service.MAX_PROMPT_LENGTH,
            "max_images_per_prompt": settings.max_images_per_prompt,
        },
        "busy_notice": None,
        "errors": errors,
        "field_errors": field_errors,
        "file_problems": list(problems.files),
    }


def time_estimates(session: Session, settings: Settings) -> dict[str, Any]:
    """What the page's script needs to say how long the studio the form describes will take."""
    offers = base_models.offered(settings)
    return {
        "models": estimates.studio_estimates(session, settings,
                                             [(offer.key, offer.spec or settings.base_model) for offer in offers]),
        "default_model": offers[0].key,
        "pack_sizes": {pack.name: len(pack.prompts) for pack in STYLE_PACKS.values()},
        "default_packs": DEFAULT_PACK,
    }


@router.get("/studios", name="studios")
def my_studios(request: Request, user: PageUser, session: SessionDep) -> Response:
    """My studios as cards: status, thumbnail, expiry date; an invitation when there are none yet."""
    cards = service.studio_cards(session, user)
    return render(request, "subjects/list.html", {"cards": cards, "status_labels": STATUS_LABELS})


@router.get("/studios/new", name="new_studio")
def new_studio(request: Request, user: PageUser, session: SessionDep, settings: SettingsDep) -> Response:
    context = new_studio_context(settings)
    context["time_estimates"] = time_estimates(session, settings)
    limit = service.studio_limit(session, user, settings)
    if limit is not None:
        # Said before the person picks photos, not only after the upload.
        context["busy_notice"] = str(limit)
    return render(request, "subjects/new.html", context)


def _with_class_noun(upload: StudioUpload) -> StudioUpload:
    """The page's two noun fields folded into ``class_noun`` according to the chosen kind."""
    field_name = {"animal": ANIMAL_NOUN_FIELD, "person": PERSON_NOUN_FIELD}.get(upload.form.kind)
    if field_name is None:
        return upload
    typed = (upload.values.get(field_name) or [upload.form.class_noun])[0]
    return replace(upload, form=replace(upload.form, class_noun=typed))


@router.post(
    "/studios",
    name="create_studio",
    # Who is asking first (no parsing for strangers), then the upload with the studio's limits, then
    # the CSRF check, which reads that same cached parse. No session is held while the body arrives.
    dependencies=[Depends(get_page_user_briefly), Depends(read_studio_upload), Depends(require_csrf_briefly)],
)
async def create_studio(request: Request, storage: StorageDep, settings: SettingsDep, upload: UploadDep) -> Response:
    """The form's post: 303 to the new studio, or the form again (422/413/429) listing every problem."""
    upload = _with_class_noun(upload)

    def create(session: Session, auth: Auth) -> Subject:
        subject, _job = service.store_studio(session, storage, settings, page_user_of(request, auth), checked)
        return subject

    try:
        # As the API does (app.subjects.api.create_subject): the limits, then the photos decoded in
        # the decode slots holding no session, then the rows in a session opened only now.
        await run_in_request_session(
            request, lambda session, auth: service.raise_if_limited(session, page_user_of(request, auth), settings)
        )
        checked = await service.check_studio_in_slots(upload.form, upload.files, settings, decode_slots(request))
        subject = await run_in_request_session(request, create)
    except service.StudioLimitReached as error:
        context = new_studio_context(settings, upload.values, message=str(error))
        return render(
            request,
            "subjects/new.html",
            context,
            status_code=error.status_code,
            headers=error.headers,
        )
    except service.StudioRejected as error:
        code = status.HTTP_413_CONTENT_TOO_LARGE if error.too_large else status.HTTP_422_UNPROCESSABLE_CONTENT
        return render(request, "subjects/new.html", new_studio_context(settings, upload.values, error.problems), code)
    return redirect_with_flash(
        request,
        f"/studios/{subject.id}",
        f"“{subject.name}” is created and in line for training. This page updates itself.",
    )


@router.post("/studios/{subject_id:uuid}/renew", name="renew_studio", dependencies=[Depends(require_csrf)])
def renew_studio(
    subject_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """"Keep longer": the studio is kept for another ``retention_days`` from today."""
    subject = repository.get_for_owner(session, user.id, subject_id)
    if subject is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such studio.")
    zone = person_zone(request)
    back = f"/studios/{subject.id}"
    if retention.renewal_offer(subject, settings) is None:
        # Nothing to add yet: say so rather than answer with the date it already had.
        return redirect_with_flash(
            request, back,
            f"“{subject.name}” is already kept until {format_date(subject.expires_at, zone)}, the longest a studio "
            f"is kept; from {format_date(retention.renewable_from(subject, settings), zone)} you can extend it.",
            "info",
        )
    before = subject.expires_at
    expires = retention.renew(session, subject, settings)
    added = (expires - before).days
    return redirect_with_flash(request, back, f"“{subject.name}” is now kept until {format_date(expires, zone)}, "
                               f"{added} day{'' if added == 1 else 's'} longer.")


@router.post("/studios/{subject_id:uuid}/rename", name="rename_studio", dependencies=[Depends(require_csrf)])
def rename_studio(
    subject_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep, name: str = Form("")
) -> Response:
    """The studio page's "Rename"."""
    subject = repository.get_for_owner(session, user.id, subject_id)
    if subject is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such studio.")
    back = f"/studios/{subject.id}"
    try:
        new_name = service.rename_subject(session, subject, name)
    except service.InvalidName as error:
        return redirect_with_flash(request, back, str(error), "warning")
    return redirect_with_flash(request, back, f"The studio is now called “{new_name}”.")


@router.post("/studios/{subject_id:uuid}/retry", name="retry_studio", dependencies=[Depends(require_csrf)])
def retry_studio(
    subject_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """"Try again" on a failed studio: a new training job from the photos it kept."""
    subject = repository.get_for_owner(session, user.id, subject_id)
    if subject is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such studio.")
    back = f"/studios/{subject.id}"
    try:
        service.retry_studio(session, settings, user, subject)
    except (service.RetryRefused, service.StudioLimitReached) as error:
        return redirect_with_flash(request, back, str(error), "warning")
    return redirect_with_flash(request, back, f"Trying again: “{subject.name}” is in line for training with the "
                               "same photos. This page updates itself.")


@router.get("/studios/{subject_id:uuid}/photos/{photo_id:uuid}", name="studio_photo")
def studio_photo(
    subject_id: uuid.UUID,
    photo_id: uuid.UUID,
    user: PageUser,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    """One of the owner's uploaded photos (the sanitized copy): streamed, or a redirect to a signed URL."""
    return photo_response(session, storage, settings, user.id, subject_id, photo_id)
