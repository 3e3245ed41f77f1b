"""The operator console's pages: queue, workers, accounts, storage, base models, and their actions.

Every route answers 404 to anyone but an active operator (the same answer as an unknown page), and
every query underneath is scoped to the operator asking (app.operator.repository).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.deps import PageUser, SessionDep, SettingsDep, StorageDep, require_csrf
from app.models import User
from app.operator import repository, service
from app.storage import Storage
from app.subjects import base_models
from app.templating import redirect_with_flash, render

router = APIRouter(include_in_schema=False)
FormText = Annotated[str, Form()]

NOT_FOUND = "Page not found"
# Seconds between the console's self-updates (static/operator.js reads it from the page).
REFRESH_SECONDS = 5


def operator_of(session: Session, user: User) -> User:
    """``user`` when it is an active operator; otherwise 404, as for a page that does not exist."""
    operator = repository.get_operator(session, user.id)
    if operator is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    return operator


def console(request: Request, template: str, section: str, context: dict[str, object]) -> Response:
    return render(request, f"operator/{template}", {"section": section, "refresh_seconds": REFRESH_SECONDS,
                                                    **context})


@router.get("/operator", name="operator_queue")
def queue_page(request: Request, user: PageUser, session: SessionDep, settings: SettingsDep) -> Response:
    """The queue: waiting jobs with position and estimated start, running jobs, recent failures by reason."""
    operator = operator_of(session, user)
    return console(request, "queue.html", "queue", {"view": service.queue_view(session, operator, settings)})


@router.get("/operator/workers", name="operator_workers")
def workers_page(request: Request, user: PageUser, session: SessionDep, settings: SettingsDep) -> Response:
    operator = operator_of(session, user)
    return console(request, "workers.html", "workers",
                   {"workers": service.workers_view(session, operator, settings)})


@router.get("/operator/accounts", name="operator_accounts")
def accounts_page(request: Request, user: PageUser, session: SessionDep, storage: StorageDep) -> Response:
    operator = operator_of(session, user)
    return console(request, "accounts.html", "accounts",
                   {"accounts": service.accounts_view(session, operator, storage), "me": operator})


@router.get("/operator/storage", name="operator_storage")
def storage_page(request: Request, user: PageUser, session: SessionDep, storage: StorageDep,
                 settings: SettingsDep) -> Response:
    operator = operator_of(session, user)
    return console(request, "storage.html", "storage", {"view": service.storage_view(session, operator, storage),
                                                        "offers": base_models.offered(settings)})


@router.get("/operator/models", name="operator_models")
def models_page(request: Request, user: PageUser, session: SessionDep, settings: SettingsDep) -> Response:
    operator_of(session, user)
    return console(request, "models.html", "models", {"offers": base_models.offered(settings)})


# --- actions --------------------------------------------------------------------------------------


@router.post("/operator/jobs/{job_id:uuid}/cancel", dependencies=[Depends(require_csrf)])
def cancel_job(job_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep,
               storage: StorageDep) -> Response:
    operator = operator_of(session, user)
    try:
        job = service.cancel_job(session, operator, job_id, storage)
    except LookupError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such job.") from None
    except service.ConsoleError as error:
        return redirect_with_flash(request, "/operator", str(error), "warning")
    message = "The job was cancelled." if job.status == "cancelled" else "Cancelling: the job stops within a few steps."
    return redirect_with_flash(request, "/operator", message, "info")


@router.post("/operator/studios/{subject_id:uuid}/retry", dependencies=[Depends(require_csrf)])
def retry_studio(subject_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep,
                 settings: SettingsDep) -> Response:
    operator = operator_of(session, user)
    try:
        service.retry_studio(session, operator, subject_id, settings)
    except LookupError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such studio.") from None
    except service.ConsoleError as error:
        return redirect_with_flash(request, "/operator", str(error), "warning")
    return redirect_with_flash(request, "/operator", "Trying again: the studio is back in line.", "info")


@router.post("/operator/accounts/{user_id:uuid}/disable", dependencies=[Depends(require_csrf)])
def disable_account(user_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep,
                    storage: StorageDep) -> Response:
    return _set_active(user_id, request, user, session, active=False, storage=storage)


@router.post("/operator/accounts/{user_id:uuid}/enable", dependencies=[Depends(require_csrf)])
def enable_account(user_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep) -> Response:
    return _set_active(user_id, request, user, session, active=True)


def _set_active(user_id: uuid.UUID, request: Request, user: User, session: Session, active: bool,
                storage: Storage | None = None) -> Response:
    operator = operator_of(session, user)
    try:
        account, stopped = service.set_active(session, operator, user_id, active, storage)
    except LookupError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such account.") from None
    except service.ConsoleError as error:
        return redirect_with_flash(request, "/operator/accounts", str(error), "warning")
    what = "enabled again" if active else "disabled: its next request is refused"
    if stopped == 1:
        what += ", and its job in progress is stopped"
    elif stopped:
        what += f", and its {stopped} jobs in progress are stopped"
    return redirect_with_flash(request, "/operator/accounts", f"{account.email} is {what}.")


def quota_field(value: object, label: str) -> int | None:
    """A number typed in a form: empty for none, else a whole number; ValueError names the field."""
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{label} must be a whole number (got “{text[:20]}”).") from None


@router.post("/operator/accounts/{user_id:uuid}/quotas", dependencies=[Depends(require_csrf)])
def set_quotas(user_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep,
               studios_per_month: FormText = "", gpu_minutes_per_month: FormText = "") -> Response:
    """Monthly quotas of one account; an empty field means no quota."""
    operator = operator_of(session, user)
    try:
        account = service.set_quotas(session, operator, user_id, quota_field(studios_per_month, "Studios per month"),
                                     quota_field(gpu_minutes_per_month, "GPU minutes per month"))
    except LookupError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such account.") from None
    except ValueError as error:
        return redirect_with_flash(request, "/operator/accounts", str(error), "error")
    return redirect_with_flash(request, "/operator/accounts", f"The quotas of {account.email} are saved.")


@router.post("/operator/priors/{bank_id:uuid}/clear", dependencies=[Depends(require_csrf)])
def clear_prior_bank(bank_id: uuid.UUID, request: Request, user: PageUser, session: SessionDep,
                     storage: StorageDep) -> Response:
    operator = operator_of(session, user)
    try:
        bank = service.clear_prior_bank(session, operator, bank_id, storage)
    except LookupError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such prior bank.") from None
    return redirect_with_flash(request, "/operator/storage",
                               f"The prior bank “{bank.class_prompt}” was cleared; the next job paints it again.")


@router.post("/operator/priors/fill", dependencies=[Depends(require_csrf)])
def fill_prior_bank(request: Request, user: PageUser, session: SessionDep, settings: SettingsDep,
                    model: FormText = "", class_noun: FormText = "", count: FormText = "") -> Response:
    """Send a GPU worker the fill of one bank (model and class); the storage page shows it once pushed."""
    operator = operator_of(session, user)
    try:
        number = quota_field(count, "The number of images")
        noun = service.request_prior_fill(session, operator, settings, model, class_noun,
                                          number if number is not None else 0)
    except ValueError as error:
        return redirect_with_flash(request, "/operator/storage", str(error), "error")
    return redirect_with_flash(request, "/operator/storage",
                               f"A GPU worker will paint {count.strip()} prior images of “{noun}”: "
                               "the bank shows them here once it is done.", "info")
