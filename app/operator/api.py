"""The operator console's JSON API under /api/v1/operator: the same views and actions as the pages.

Anyone but an active operator gets 404 on every route, as for an address that does not exist.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from app.deps import ApiUser, SessionDep, SettingsDep, StorageDep, require_csrf
from app.models import Job, User
from app.operator import repository, service

router = APIRouter(prefix="/api/v1/operator", tags=["operator"], responses={
    404: {"description": "The account is not an operator (the same answer as an address that does not exist), "
                         "or no such object"},
})

NOT_FOUND = "Not Found"


def operator_of(session: Session, user: User) -> User:
    operator = repository.get_operator(session, user.id)
    if operator is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    return operator


class ConsoleJob(BaseModel):
    id: uuid.UUID
    subject_id: uuid.UUID
    owner_id: uuid.UUID
    kind: str
    status: str
    stage: str
    step: int
    total: int
    eta_seconds: float | None
    attempts: int
    failure_reason: str | None


def console_job(job: Job) -> ConsoleJob:
    return ConsoleJob(id=job.id, subject_id=job.subject_id, owner_id=job.owner_id, kind=job.kind, status=job.status,
                      stage=job.stage, step=job.step, total=job.total, eta_seconds=job.eta_seconds,
                      attempts=job.attempts, failure_reason=job.failure_reason)


class QueuedOut(BaseModel):
    job: ConsoleJob
    position: int
    estimated_start_seconds: float | None = Field(description="null while no GPU worker heartbeats")


class RunningOut(BaseModel):
    job: ConsoleJob
    worker: str | None


class FailureGroupOut(BaseModel):
    reason: str
    jobs: list[ConsoleJob]


class QueueOut(BaseModel):
    queued: list[QueuedOut]
    running: list[RunningOut]
    failures: list[FailureGroupOut]
    live_gpu_workers: int


class WorkerOut(BaseModel):
    name: str
    host: str
    queues: list[str]
    gpu_name: str | None
    gpu_memory_used_bytes: int | None
    gpu_memory_total_bytes: int | None
    gpu_utilisation: float | None
    current_job_id: uuid.UUID | None
    steps_per_second: float | None
    last_seen_at: datetime
    lost: bool


class AccountOut(BaseModel):
    id: uuid.UUID
    email: str
    is_active: bool
    is_operator: bool
    studios: int
    pictures: int
    storage_bytes: int
    gpu_minutes: float
    gpu_minutes_this_month: float
    studios_per_month: int | None
    gpu_minutes_per_month: int | None


class AccountChange(BaseModel):
    """Fields to change; a quota set to null means no quota."""

    is_active: bool | None = None
    studios_per_month: int | None = Field(default=None, ge=0)
    gpu_minutes_per_month: int | None = Field(default=None, ge=0)


@router.get("/queue", response_model=QueueOut)
def get_queue(user: ApiUser, session: SessionDep, settings: SettingsDep) -> QueueOut:
    """Waiting jobs with position and estimated start, running jobs with their worker, failures by reason."""
    view = service.queue_view(session, operator_of(session, user), settings)
    return QueueOut(
        queued=[QueuedOut(job=console_job(q.job), position=q.position,
                          estimated_start_seconds=q.estimated_start_seconds) for q in view.queued],
        running=[RunningOut(job=console_job(r.job), worker=r.worker) for r in view.running],
        failures=[FailureGroupOut(reason=g.reason, jobs=[console_job(job) for job, _, _ in g.jobs])
                  for g in view.failures],
        live_gpu_workers=view.live_gpu_workers,
    )


@router.get("/workers", response_model=list[WorkerOut])
def get_workers(user: ApiUser, session: SessionDep, settings: SettingsDep) -> list[WorkerOut]:
    """Every worker that ever heartbeat, with its GPU, current job and speed; ``lost`` once it stopped."""
    views = service.workers_view(session, operator_of(session, user), settings)
    return [WorkerOut(name=v.worker.name, host=v.worker.host, queues=list(v.worker.queues or []),
                      gpu_name=v.worker.gpu_name, gpu_memory_used_bytes=v.worker.gpu_memory_used_bytes,
                      gpu_memory_total_bytes=v.worker.gpu_memory_total_bytes,
                      gpu_utilisation=v.worker.gpu_utilisation, current_job_id=v.worker.current_job_id,
                      steps_per_second=v.worker.steps_per_second, last_seen_at=v.worker.last_seen_at, lost=v.lost)
            for v in views]


def account_out(usage: service.AccountUsage) -> AccountOut:
    user = usage.user
    return AccountOut(id=user.id, email=user.email, is_active=user.is_active, is_operator=user.is_operator,
                      studios=usage.studios, pictures=usage.pictures, storage_bytes=usage.storage_bytes,
                      gpu_minutes=round(usage.gpu_minutes, 2),
                      gpu_minutes_this_month=round(usage.gpu_minutes_this_month, 2),
                      studios_per_month=user.studios_per_month, gpu_minutes_per_month=user.gpu_minutes_per_month)


@router.get("/accounts", response_model=list[AccountOut])
def get_accounts(user: ApiUser, session: SessionDep, storage: StorageDep) -> list[AccountOut]:
    """Every account with its studios, pictures, storage and GPU minutes (all time and this month)."""
    return [account_out(usage) for usage in service.accounts_view(session, operator_of(session, user), storage)]


@router.patch("/accounts/{user_id:uuid}", response_model=AccountOut, dependencies=[Depends(require_csrf)],
              responses={409: {"description": "An operator cannot disable its own account"}})
def change_account(user_id: uuid.UUID, change: AccountChange, user: ApiUser, session: SessionDep,
                   storage: StorageDep) -> AccountOut:
    """Disable or re-enable an account, or set its monthly quotas (only the fields sent change).
    Disabling cancels the account's queued and running jobs."""
    operator = operator_of(session, user)
    try:
        account = repository.get_account(session, operator.id, user_id)
        if account is None:
            raise LookupError("No such account.")
        if change.is_active is not None:
            account, _ = service.set_active(session, operator, user_id, change.is_active, storage)
        sent = change.model_fields_set
        if "studios_per_month" in sent or "gpu_minutes_per_month" in sent:
            account = service.set_quotas(
                session, operator, user_id,
                change.studios_per_month if "studios_per_month" in sent else account.studios_per_month,
                change.gpu_minutes_per_month if "gpu_minutes_per_month" in sent else account.gpu_minutes_per_month,
            )
    except LookupError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such account.") from None
    except service.ConsoleError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    # The storage total is left out of this answer: adding it up lists every object.
    usage = next(u for u in service.accounts_view(session, operator, None) if u.user.id == account.id)
    return account_out(usage)


@router.post("/jobs/{job_id:uuid}/cancel", response_model=ConsoleJob, dependencies=[Depends(require_csrf)],
             responses={409: {"description": "The job already ended"}})
def cancel_job(job_id: uuid.UUID, user: ApiUser, session: SessionDep, storage: StorageDep) -> ConsoleJob:
    """Cancel any account's job: a queued one ends at once, a running one stops within a few steps."""
    try:
        job = service.cancel_job(session, operator_of(session, user), job_id, storage)
    except LookupError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such job.") from None
    except service.ConsoleError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return console_job(job)


@router.post("/subjects/{subject_id:uuid}/retry", response_model=ConsoleJob, status_code=201,
             dependencies=[Depends(require_csrf)],
             responses={409: {"description": "The studio cannot be tried again, or its owner is at a limit"}})
def retry_subject(subject_id: uuid.UUID, user: ApiUser, session: SessionDep, settings: SettingsDep) -> ConsoleJob:
    """Try a failed or cancelled studio again for its owner (the owner's active-job limit applies)."""
    try:
        job = service.retry_studio(session, operator_of(session, user), subject_id, settings)
    except LookupError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such studio.") from None
    except service.ConsoleError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return console_job(job)
