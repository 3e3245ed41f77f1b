"""Gallery pages: the grid by prompt, one image (the no-script full view), files and downloads, favourites,
"generate more", the ZIP, and deleting the studio after a confirmation page."""

from __future__ import annotations

import uuid
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.config import Settings
from app.deps import PageUser, SessionDep, SettingsDep, StorageDep, require_csrf
from app.galleries import model_export, repository, service
from app.galleries.files import file_response, model_download_response, zip_response
from app.jobs import repository as job_repository
from app.models import GeneratedImage, Subject, User
from app.subjects import repository as subject_repository
from app.templating import redirect_with_flash, render

router = APIRouter(include_in_schema=False)

SortChoice = Literal["likeness", "created"]


def owned_subject(session: Session, subject_id: uuid.UUID, user: User) -> Subject:
    subject = subject_repository.get_for_owner(session, user.id, subject_id)
    if subject is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such studio.")
    return subject


def owned_image(
    session: Session, subject_id: uuid.UUID, image_id: uuid.UUID, user: User
) -> tuple[GeneratedImage, Subject]:
    found = repository.get_image_with_subject(session, image_id, user.id, subject_id=subject_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such image.")
    return found


def gallery_url(subject_id: uuid.UUID, favourites: bool = False, sort: str | None = None) -> str:
    query = {key: value for key, value in (("favourites", "1" if favourites else ""), ("sort", sort or "")) if value}
    return f"/studios/{subject_id}/gallery" + (f"?{urlencode(query)}" if query else "")


def gallery_context(
    session: Session,
    settings: Settings,
    subject: Subject,
    user: User,
    favourites: bool,
    sort: SortChoice | None,
) -> dict[str, Any]:
    """What the gallery page shows; ``sort`` None means "by likeness when the images were scored"."""
    all_images = repository.images_of_subject(session, subject.id, user.id)
    scored = service.has_scores(all_images)
    chosen: SortChoice = sort or ("likeness" if scored else "created")
    images = repository.images_of_subject(session, subject.id, user.id, favourites_only=favourites, sort=chosen)
    jobs = job_repository.jobs_of_subject(session, subject.id, user.id)
    active_job = next((job for job in jobs if job.status in ("queued", "running")), None)
    return {
        "subject": subject,
        "groups": service.group_by_prompt(subject, images),
        "images": images,
        "total_count": len(all_images),
        "favourite_count": sum(1 for image in all_images if image.favourite),
        "positions": service.positions_by_image(all_images),
        "face_matches": {image.id: service.face_match(image) for image in all_images},
        "favourites_only": favourites,
        "sort": chosen,
        "scored": scored,
        "active_job": active_job,
        "can_generate": subject.weights_key is not None and active_job is None,
        "trained_model": model_export.trained_model(subject),
        "max_prompts": settings.max_prompts,
        "max_images_per_prompt": settings.max_images_per_prompt,
        "generate_form": {"prompts": "", "images_per_prompt": min(4, settings.max_images_per_prompt)},
        "generate_error": None,
        "gallery_url": gallery_url(subject.id, favourites, sort),
    }


@router.get("/studios/{subject_id:uuid}/gallery", name="gallery")
def gallery_page(
    subject_id: uuid.UUID,
    request: Request,
    user: PageUser,
    session: SessionDep,
    settings: SettingsDep,
    favourites: bool = False,
    sort: SortChoice | None = None,
) -> Response:
    subject = owned_subject(session, subject_id, user)
    context = gallery_context(session, settings, subject, user, favourites, sort)
    return render(request, "galleries/gallery.html", context)


@router.get("/studios/{subject_id:uuid}/images/{image_id:uuid}", name="image")
def image_page(
    subject_id: uuid.UUID,
    image_id: uuid.UUID,
    request: Request,
    user: PageUser,
    session: SessionDep,
    favourites: bool = False,
    sort: SortChoice | None = None,
) -> Response:
    """One image at full size with previous/next links: the gallery's full view without JavaScript."""
    image, subject = owned_image(session, subject_id, image_id, user)
    order: SortChoice = sort or "created"
    images = repository.images_of_subject(session, subject.id, user.id, favourites_only=favourites, sort=order)
    ids = [each.id for each in images]
    index = ids.index(image.id) if image.id in ids else None
    previous = images[index - 1] if index is not None and index > 0 else None
    following = images[index + 1] if index is not None and index + 1 < len(images) else None
    query = urlencode({key: value for key, value in (("favourites", "1" if favourites else ""), ("sort", sort or ""))
                       if value})
    context = {
        "subject": subject,
        "image": image,
        "face_match": service.face_match(image),
        "readable_prompt": service.readable_prompt(image.prompt_template, subject.name),
        "prompt_parts": service.prompt_parts(image.prompt_template),
        "previous": previous,
        "next": following,
        "index": index,
        "count": len(images),
        "query": f"?{query}" if query else "",
        "gallery_url": gallery_url(subject.id, favourites, sort),
        "filename": service.download_filename(subject, image, repository.position_in_prompt(session, image)),
    }
    return render(request, "galleries/image.html", context)


@router.get("/studios/{subject_id:uuid}/images/{image_id:uuid}/file", name="image_file")
def image_file(
    subject_id: uuid.UUID,
    image_id: uuid.UUID,
    user: PageUser,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    image, subject = owned_image(session, subject_id, image_id, user)
    # The gallery shows many of these: no position in the name, so no extra query per picture.
    filename = service.download_filename(subject, image)
    return file_response(storage, settings, image.storage_key, "image/png", filename, "inline")


@router.get("/studios/{subject_id:uuid}/images/{image_id:uuid}/download", name="image_download")
def image_download(
    subject_id: uuid.UUID,
    image_id: uuid.UUID,
    user: PageUser,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    """The PNG as an attachment named after the prompt: "rex-on-the-beach-3.png"."""
    image, subject = owned_image(session, subject_id, image_id, user)
    filename = service.download_filename(subject, image, repository.position_in_prompt(session, image))
    return file_response(storage, settings, image.storage_key, "image/png", filename, "attachment")


@router.post(
    "/studios/{subject_id:uuid}/images/{image_id:uuid}/favourite",
    name="image_favourite",
    dependencies=[Depends(require_csrf)],
)
def favourite_form(
    subject_id: uuid.UUID,
    image_id: uuid.UUID,
    request: Request,
    user: PageUser,
    session: SessionDep,
    favourite: bool = Form(...),
    return_to: str = Form(""),
) -> Response:
    """The heart button without JavaScript; back to the page it came from (only this studio's pages)."""
    image, subject = owned_image(session, subject_id, image_id, user)
    service.set_favourite(session, image, favourite)
    own_pages = f"/studios/{subject.id}/"
    back = return_to if return_to.startswith(own_pages) and "//" not in return_to else gallery_url(subject.id)
    message = "Added to your favourites." if favourite else "Removed from your favourites."
    return redirect_with_flash(request, back, message, "success")


@router.post("/studios/{subject_id:uuid}/generate", name="generate_more", dependencies=[Depends(require_csrf)])
def generate_form(
    subject_id: uuid.UUID,
    request: Request,
    user: PageUser,
    session: SessionDep,
    settings: SettingsDep,
    prompts: str = Form(""),
    images_per_prompt: int = Form(4),
) -> Response:
    """"Generate more": one prompt per line; on success the studio page shows the new job's progress."""
    subject = owned_subject(session, subject_id, user)
    try:
        service.request_generation(session, settings, subject, prompts.splitlines(), images_per_prompt)
    except service.GalleryError as error:
        context = gallery_context(session, settings, subject, user, False, None)
        context["generate_form"] = {"prompts": prompts, "images_per_prompt": images_per_prompt}
        context["generate_error"] = str(error)
        if isinstance(error, service.TooManyActiveJobs):
            headers = {"Retry-After": str(service.RETRY_AFTER_SECONDS)}
            return render(request, "galleries/gallery.html", context, status_code=429, headers=headers)
        code = status.HTTP_409_CONFLICT if isinstance(error, service.GenerationNotPossible) else 422
        return render(request, "galleries/gallery.html", context, status_code=code)
    return redirect_with_flash(
        request, f"/studios/{subject.id}", "New pictures are on their way: follow them here.", "success"
    )


@router.get("/studios/{subject_id:uuid}/download.zip", name="gallery_zip")
def gallery_zip(
    subject_id: uuid.UUID,
    user: PageUser,
    session: SessionDep,
    storage: StorageDep,
    favourites: bool = False,
) -> StreamingResponse:
    subject = owned_subject(session, subject_id, user)
    images = repository.images_of_subject(session, subject.id, user.id, favourites_only=favourites)
    return zip_response(storage, subject, images)


@router.get("/studios/{subject_id:uuid}/model/{variant}", name="model_download")
def model_download(
    subject_id: uuid.UUID,
    variant: model_export.DownloadVariant,
    user: PageUser,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    """The trained model to use in other tools (see the gallery's "Your model" card)."""
    return model_download_response(storage, settings, owned_subject(session, subject_id, user), variant)


@router.get("/studios/{subject_id:uuid}/delete", name="delete_studio_confirm")
def delete_confirm_page(subject_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep) -> Response:
    """What deleting removes, and the button that does it."""
    subject = owned_subject(session, subject_id, user)
    jobs = job_repository.jobs_of_subject(session, subject.id, user.id)
    context = {
        "subject": subject,
        "photo_count": len(subject_repository.photos_of(session, subject)),
        "image_count": repository.count_images(session, subject.id),
        "has_model": subject.weights_key is not None,
        "active_jobs": [job for job in jobs if job.status in ("queued", "running")],
    }
    return render(request, "galleries/delete.html", context)


@router.post("/studios/{subject_id:uuid}/delete", name="delete_studio", dependencies=[Depends(require_csrf)])
def delete_studio(
    subject_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep, storage: StorageDep
) -> Response:
    from app.subjects.deletion import delete_subject  # P1's module; imported here to keep start-up light

    subject = owned_subject(session, subject_id, user)
    name = subject.name
    delete_subject(session, storage, subject)
    return redirect_with_flash(request, "/studios", f"“{name}” and every file of it were deleted.", "success")
