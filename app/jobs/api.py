"""The jobs JSON API: status (polled by every open studio page), a subject's jobs, cancel, preview images."""

from __future__ import annotations

import uuid
from functools import partial

from fastapi import APIRouter, Depends, HTTPException, Request, status
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.deps import ApiUser, SessionDep, SettingsDep, StorageDep, require_csrf, run_as_api_user
from app.galleries.files import file_response
from app.jobs import repository, service
from app.jobs.schemas import JobStatus
from app.models import User
from app.subjects import repository as subject_repository

router = APIRouter(prefix="/api/v1", tags=["jobs"])

JOB_NOT_FOUND = "No such job."
SUBJECT_NOT_FOUND = "No such studio."


@router.get("/jobs/{job_id:uuid}", response_model=JobStatus)
async def get_job_status(job_id: uuid.UUID, request: Request, response: Response) -> JobStatus:
    """Where a job is. Every open studio page polls this every second or two, so it answers in one trip
    to the thread pool: who is asking, one query for the job and its subject's class noun, one count
    for the queue position while queued, and no storage calls."""
    response.headers["Cache-Control"] = "no-store"
    return await run_as_api_user(request, partial(owned_job_status, job_id=job_id))


def owned_job_status(session: Session, user: User, job_id: uuid.UUID) -> JobStatus:
    found = repository.get_job_and_class_noun(session, job_id, user.id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, JOB_NOT_FOUND)
    job, class_noun = found
    return service.job_status(session, job, class_noun)


@router.get("/subjects/{subject_id:uuid}/jobs", response_model=list[JobStatus])
def list_subject_jobs(subject_id: uuid.UUID, user: ApiUser, session: SessionDep) -> list[JobStatus]:
    """The studio's jobs, newest first: its training and every "generate more"."""
    subject = subject_repository.get_for_owner(session, user.id, subject_id)
    if subject is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, SUBJECT_NOT_FOUND)
    jobs = repository.jobs_of_subject(session, subject.id, user.id)
    return [service.job_status(session, job, subject.class_noun) for job in jobs]


@router.post("/jobs/{job_id:uuid}/cancel", response_model=JobStatus, dependencies=[Depends(require_csrf)])
def cancel_job(job_id: uuid.UUID, user: ApiUser, session: SessionDep, storage: StorageDep) -> JobStatus:
    """Cancel a job: a queued job ends at once, a running one stops within a few steps. 409 once it ended."""
    found = repository.get_job_and_class_noun(session, job_id, user.id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, JOB_NOT_FOUND)
    job, class_noun = found
    try:
        service.cancel_job(session, job, storage)
    except service.JobNotCancellable as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return service.job_status(session, job, class_noun)


@router.get("/jobs/{job_id:uuid}/previews/{index:int}", response_class=Response)
def get_job_preview(
    job_id: uuid.UUID, index: int, user: ApiUser, session: SessionDep, storage: StorageDep, settings: SettingsDep
) -> Response:
    """A preview image the worker saved while training (PNG), by its position in the status's preview_urls."""
    job = repository.get_job(session, job_id, user.id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, JOB_NOT_FOUND)
    keys = job.preview_keys or []
    if not 0 <= index < len(keys):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such preview.")
    return file_response(storage, settings, keys[index], "image/png", f"preview-{index + 1}.png")
