"""The studio page: who the subject is, where its job is (updating itself), and the way to the gallery."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, HTTPException, Request, status
from starlette.responses import Response

from app.deps import PageUser, SessionDep, SettingsDep, StorageDep, require_csrf
from app.galleries import repository as gallery_repository
from app.jobs import repository, service
from app.subjects import base_models, retention
from app.subjects import repository as subject_repository
from app.templating import redirect_with_flash, render

router = APIRouter(include_in_schema=False)

DEMO_MODEL_NOTICE = (
    "This studio runs on the built-in demo model: pictures are noise-like previews — "
    "configure a real checkpoint for real results."
)


@router.get("/studios/{subject_id:uuid}", name="studio")
def studio_page(
    subject_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """The studio: its photos, the latest job with a live stepper, and what can be done next."""
    subject = subject_repository.get_for_owner(session, user.id, subject_id)
    if subject is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such studio.")
    jobs = repository.jobs_of_subject(session, subject.id, user.id)
    job = jobs[0] if jobs else None
    job_status = service.job_status(session, job, subject.class_noun) if job is not None else None
    # The trained model is the last training job's; a demo "generate more" job says so in its details too.
    demo_model = (any(service.is_demo_model(each) for each in jobs[:2]) or subject.base_model == "tiny"
                  or bool((subject.model_info or {}).get("demo_model")))
    # Before training publishes, the family is in the training job's details (the worker records it on loading).
    training = next((each for each in jobs if each.kind == "train"), None)
    image_count = gallery_repository.count_images(session, subject.id)
    context = {
        "subject": subject,
        "job": job,
        "status": job_status,
        "jobs": jobs,
        "photos": subject_repository.photos_of(session, subject),
        "photos_deleted": subject.photos_deleted_at is not None,
        "image_count": image_count,
        # "Keep it longer" only when it adds time (see retention.renewal_offer).
        "renewal_offer": retention.renewal_offer(subject, settings),
        "demo_model": demo_model,
        "demo_notice": DEMO_MODEL_NOTICE,
        "base_model": base_models.model_facts(subject, training.details if training is not None else None),
        "can_generate": subject.weights_key is not None and (job_status is None or job_status.finished),
        # "Try again" reuses the kept photos of a studio never trained (the button shows once the job failed).
        "can_retry": job is not None and job.kind == "train" and subject.weights_key is None
        and subject.photos_deleted_at is None,
    }
    return render(request, "jobs/studio.html", context)


@router.post(
    "/studios/{subject_id:uuid}/jobs/{job_id:uuid}/cancel", name="cancel_job", dependencies=[Depends(require_csrf)]
)
def cancel_job_form(
    subject_id: uuid.UUID, job_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep,
    storage: StorageDep,
) -> Response:
    """The studio page's cancel button (the page's script asks for confirmation first)."""
    job = repository.get_job(session, job_id, user.id)
    if job is None or job.subject_id != subject_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such job.")
    back = f"/studios/{subject_id}"
    try:
        service.cancel_job(session, job, storage)
    except service.JobNotCancellable as error:
        return redirect_with_flash(request, back, str(error), "warning")
    message = "The job was cancelled." if job.status == "cancelled" else "Cancelling: the job stops within a few steps."
    return redirect_with_flash(request, back, message, "info")
