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
from app.galleries import model_export, repository, service, sharing
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
    chosen: SortChoice = sort or service.default_order(all_images)
    shown = [image for image in all_images if image.favourite] if favourites else all_images
    groups = service.arrange(subject, shown, chosen)
    images = service.viewing_order(groups)
    jobs = job_repository.jobs_of_subject(session, subject.id, user.id)
    active_job = next((job for job in jobs if job.status in ("queued", "running")), None)
    return {
        "subject": subject,
        "groups": groups,
        "images": images,
        "captions": {image.id: service.readable_prompt(image.prompt_template, subject.name) for image in images},
        "caption_parts": {image.id: service.prompt_parts(image.prompt_template) for image in images},
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
        "generate_form": {"prompts": "", "images_per_prompt": min(4, settings.max_images_per_prompt),
                          "shape": "square"},
        "shape_choices": service.SHAPE_CHOICES,
        "generate_error": None,
        "gallery_url": gallery_url(subject.id, favourites, sort),
        "shares": [(link, sharing.share_url(settings, link))
                   for link in sharing.links_of(session, subject.id, user.id)],
        "share_days": sharing.SHARE_DAYS,
        "default_share_days": sharing.DEFAULT_SHARE_DAYS,
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
    settings: SettingsDep,
    favourites: bool = False,
    sort: SortChoice | None = None,
) -> Response:
    """One image at full size with previous/next links: the gallery's full view without JavaScript."""
    image, subject = owned_image(session, subject_id, image_id, user)
    all_images = repository.images_of_subject(session, subject.id, user.id)
    shown = [each for each in all_images if each.favourite] if favourites else all_images
    # The gallery's order, from the same service function (its lightbox walks the same one).
    images = service.viewing_order(service.arrange(subject, shown, sort or service.default_order(all_images)))
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
        "shape": service.shape_of(image),
        "can_generate": subject.weights_key is not None
        and job_repository.active_job_of_subject(session, subject.id) is None,
        "more_count": min(service.MORE_LIKE_THIS_COUNT, settings.max_images_per_prompt),
        "share_days": sharing.SHARE_DAYS,
        "default_share_days": sharing.DEFAULT_SHARE_DAYS,
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


@router.post(
    "/studios/{subject_id:uuid}/images/{image_id:uuid}/delete",
    name="image_delete",
    dependencies=[Depends(require_csrf)],
)
def delete_image_form(
    subject_id: uuid.UUID, image_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep,
    storage: StorageDep,
) -> Response:
    """"Delete this picture" on the image page (the page asks first); back to the gallery."""
    image, subject = owned_image(session, subject_id, image_id, user)
    service.delete_image(session, storage, image)
    return redirect_with_flash(request, gallery_url(subject.id), "The picture was deleted.", "success")


@router.post(
    "/studios/{subject_id:uuid}/images/{image_id:uuid}/more",
    name="image_more",
    dependencies=[Depends(require_csrf)],
)
def more_like_this_form(
    subject_id: uuid.UUID, image_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep,
    settings: SettingsDep,
) -> Response:
    """"More like this": new pictures of this prompt with new seeds; the studio page follows the job."""
    image, subject = owned_image(session, subject_id, image_id, user)
    try:
        service.request_more_like(session, settings, subject, image)
    except service.GalleryError as error:
        back = f"/studios/{subject.id}/images/{image.id}"
        return redirect_with_flash(request, back, str(error), "warning")
    return redirect_with_flash(
        request, f"/studios/{subject.id}", "More pictures like this one are on their way: follow them here.", "success"
    )


@router.post("/studios/{subject_id:uuid}/shares", name="share_create", dependencies=[Depends(require_csrf)])
def create_share_form(
    subject_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep,
    image_id: str = Form(""), days: int = Form(sharing.DEFAULT_SHARE_DAYS),
) -> Response:
    """"Share": a link of the gallery, or of one picture (``image_id``); back to the gallery's share card."""
    subject = owned_subject(session, subject_id, user)
    image = None
    if image_id:
        try:
            image, _ = owned_image(session, subject.id, uuid.UUID(image_id), user)
        except ValueError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "No such image.") from None
    back = f"{gallery_url(subject.id)}#share"
    try:
        sharing.create_share(session, subject, image, days)
    except sharing.ShareRefused as error:
        return redirect_with_flash(request, back, str(error), "warning")
    what = "this picture" if image is not None else "the gallery"
    return redirect_with_flash(request, back, f"A link to {what} is ready below: copy it and send it. "
                               f"It works for {days} day{'' if days == 1 else 's'} unless you turn it off.")


@router.post(
    "/studios/{subject_id:uuid}/shares/{share_id:uuid}/revoke",
    name="share_revoke",
    dependencies=[Depends(require_csrf)],
)
def revoke_share_form(
    subject_id: uuid.UUID, share_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep
) -> Response:
    subject = owned_subject(session, subject_id, user)
    link = sharing.get_owned(session, share_id, user.id)
    if link is None or link.subject_id != subject.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such share link.")
    sharing.revoke(session, link)
    return redirect_with_flash(request, f"{gallery_url(subject.id)}#share", "The link is turned off.", "success")


# --- what a share link shows (no account needed: the link is the permission) -----------------------


@router.get("/s/{token}", name="shared")
def shared_page(token: str, request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """The pictures of a live share link, read-only; 404 for a link that is forged, revoked or expired."""
    opened = sharing.open_share(session, settings, token)
    if opened is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "This link has expired or was turned off.")
    link, subject = opened
    images = sharing.shared_images(session, link)
    context = {
        "subject": subject,
        "link": link,
        "token": token,
        "images": images,
        "captions": {image.id: service.readable_prompt(image.prompt_template, subject.name) for image in images},
    }
    return render(request, "galleries/shared.html", context, headers={"Referrer-Policy": "no-referrer",
                                                                       "X-Robots-Tag": "noindex"})


@router.get("/s/{token}/images/{image_id:uuid}/file", name="shared_file")
def shared_file(
    token: str, image_id: uuid.UUID, session: SessionDep, storage: StorageDep, settings: SettingsDep
) -> Response:
    opened = sharing.open_share(session, settings, token)
    image = next((each for each in sharing.shared_images(session, opened[0]) if each.id == image_id),
                 None) if opened is not None else None
    if opened is None or image is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such image.")
    return file_response(storage, settings, image.storage_key, "image/png",
                         service.download_filename(opened[1], image), "inline")


@router.post("/studios/{subject_id:uuid}/generate", name="generate_more", dependencies=[Depends(require_csrf)])
def generate_form(
    subject_id: uuid.UUID,
    request: Request,
    user: PageUser,
    session: SessionDep,
    settings: SettingsDep,
    prompts: str = Form(""),
    images_per_prompt: int = Form(4),
    shape: Literal["square", "portrait", "landscape"] = Form("square"),
) -> Response:
    """"Generate more": one prompt per line; on success the studio page shows the new job's progress."""
    subject = owned_subject(session, subject_id, user)
    try:
        service.request_generation(session, settings, subject, prompts.splitlines(), images_per_prompt, shape)
    except service.GalleryError as error:
        context = gallery_context(session, settings, subject, user, False, None)
        context["generate_form"] = {"prompts": prompts, "images_per_prompt": images_per_prompt, "shape": shape}
        context["generate_error"] = str(error)
        if isinstance(error, service.TooManyActiveJobs):
            headers = {"Retry-After": str(error.retry_after)}
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
