"""Rules of the operator console: the queue with its estimates, workers (lost or alive), accounts with
their usage and quotas, storage by kind, and the actions (cancel, retry, disable, quotas, priors).

Services flush, never commit: the request's session dependency owns the transaction. Every query
goes through :mod:`app.operator.repository`, scoped to the operator asking.
"""

from __future__ import annotations

import heapq
import logging
import re
import statistics
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.accounts.usage import gpu_seconds, month_start
from app.config import Settings
from app.jobs import repository as job_repository
from app.jobs import service as job_service
from app.models import Job, PriorBank, Subject, User, WorkerHeartbeat, utcnow
from app.operator import repository
from app.storage import Storage
from app.storage.base import StoredObject
from app.subjects import base_models
from app.subjects import service as subject_service

log = logging.getLogger(__name__)

GPU_QUEUE = "gpu"  # worker.celery_app.GPU_QUEUE; not imported, so the web never loads Celery's worker side
# Used for the estimated start of queued jobs until a training job has finished here.
DEFAULT_JOB_SECONDS = 15 * 60
FAILURE_DAYS = 7
STORAGE_KINDS = ("photos", "weights", "pictures", "zips", "jobs", "prior bank", "other")


class ConsoleError(Exception):
    """An operator action that cannot be done; the message says why (answered 409 or as a flash)."""


# --- the queue ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueuedJob:
    job: Job
    subject: Subject
    owner_email: str
    position: int
    estimated_start_seconds: float | None  # None: no live GPU worker to run it


@dataclass(frozen=True)
class RunningJob:
    job: Job
    subject: Subject
    owner_email: str
    worker: str | None  # the worker row's name, or the lease holder when no row claims the job


@dataclass(frozen=True)
class FailureGroup:
    reason: str
    jobs: list[tuple[Job, Subject, str]]


@dataclass(frozen=True)
class QueueView:
    queued: list[QueuedJob]
    running: list[RunningJob]
    failures: list[FailureGroup]
    failure_days: int
    live_gpu_workers: int


def is_lost(worker: WorkerHeartbeat, settings: Settings, now: datetime | None = None) -> bool:
    """A worker whose last heartbeat is older than ``settings.worker_lost_seconds``."""
    return (now or utcnow()) - worker.last_seen_at > timedelta(seconds=settings.worker_lost_seconds)


def live_gpu_workers(workers: list[WorkerHeartbeat], settings: Settings) -> list[WorkerHeartbeat]:
    now = utcnow()
    return [w for w in workers if GPU_QUEUE in (w.queues or []) and not is_lost(w, settings, now)]


def failure_key(reason: str | None) -> str:
    """What failures are grouped by: the reason's first sentence (the rest often names a file or a number)."""
    text = (reason or "No reason recorded.").strip()
    first = text.split(". ", 1)[0].rstrip(".")
    return (first[:160] + "…") if len(first) > 160 else first + "."


def estimate_starts(queued: int, running_etas: list[float | None], idle_workers: int,
                    job_seconds: float) -> list[float | None]:
    """Seconds until each of ``queued`` jobs (in queue order) should start.

    Each live GPU worker runs one job at a time: an idle one is free now, a busy one when its job's
    ETA runs out (``job_seconds`` when the job has none yet). Each queued job takes the worker that
    is free first and holds it for ``job_seconds``. Without any worker nothing can be estimated.
    """
    free_at = [0.0] * idle_workers + [eta if eta is not None else job_seconds for eta in running_etas]
    if not free_at:
        return [None] * queued
    heapq.heapify(free_at)
    starts: list[float | None] = []
    for _ in range(queued):
        start = heapq.heappop(free_at)
        starts.append(start)
        heapq.heappush(free_at, start + job_seconds)
    return starts


def queue_view(session: Session, operator: User, settings: Settings) -> QueueView:
    workers = repository.workers(session, operator.id)
    live = live_gpu_workers(workers, settings)
    by_job = {w.current_job_id: w for w in workers if w.current_job_id is not None}
    running_rows = repository.jobs_with_status(session, operator.id, "running")
    running = [
        RunningJob(job, subject, email,
                   by_job[job.id].name if job.id in by_job else job.lease_holder)
        for job, subject, email in running_rows
    ]
    durations = repository.recent_durations(session, operator.id)
    job_seconds = statistics.median(durations) if durations else DEFAULT_JOB_SECONDS
    queued_rows = repository.jobs_with_status(session, operator.id, "queued")
    live_names = {w.name for w in live}
    busy_etas = [job.eta_seconds for job in (r.job for r in running) if by_job.get(job.id) is not None
                 and by_job[job.id].name in live_names]
    idle = max(0, len(live) - len(busy_etas))
    starts = estimate_starts(len(queued_rows), busy_etas, idle, job_seconds)
    queued = [QueuedJob(job, subject, email, position, start)
              for position, ((job, subject, email), start) in enumerate(zip(queued_rows, starts, strict=True), 1)]
    groups: dict[str, list[tuple[Job, Subject, str]]] = defaultdict(list)
    for row in repository.failures_since(session, operator.id, utcnow() - timedelta(days=FAILURE_DAYS)):
        groups[failure_key(row[0].failure_reason)].append(row)
    failures = sorted((FailureGroup(reason, jobs) for reason, jobs in groups.items()), key=lambda g: -len(g.jobs))
    return QueueView(queued, running, failures, FAILURE_DAYS, len(live))


def cancel_job(session: Session, operator: User, job_id: uuid.UUID, storage: Storage) -> Job:
    """Cancel any account's job with the owner's own rules (app.jobs.service.cancel_job).

    Raises LookupError for an unknown job, :class:`ConsoleError` for one that already ended.
    """
    job = repository.get_job(session, operator.id, job_id)
    if job is None:
        raise LookupError("No such job.")
    try:
        job_service.cancel_job(session, job, storage)
    except job_service.JobNotCancellable as error:
        raise ConsoleError(str(error)) from None
    log.info("operator %s cancelled job %s", operator.id, job.id, extra={"job_id": str(job.id),
                                                                         "account_id": str(job.owner_id)})
    return job


def retry_studio(session: Session, operator: User, subject_id: uuid.UUID, settings: Settings) -> Job:
    """Try a failed or cancelled studio again for its owner (app.subjects.service.retry_studio, owner's limits).

    Raises LookupError for an unknown studio, :class:`ConsoleError` when it cannot be tried again.
    """
    subject = repository.get_subject(session, operator.id, subject_id)
    if subject is None:
        raise LookupError("No such studio.")
    owner = repository.get_account(session, operator.id, subject.owner_id)
    if owner is None:
        raise LookupError("No such studio.")
    try:
        job = subject_service.retry_studio(session, settings, owner, subject)
    except (subject_service.RetryRefused, subject_service.StudioLimitReached) as error:
        raise ConsoleError(str(error)) from None
    log.info("operator %s retried studio %s as job %s", operator.id, subject.id, job.id,
             extra={"job_id": str(job.id), "account_id": str(owner.id)})
    return job


# --- workers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerView:
    worker: WorkerHeartbeat
    lost: bool
    job: Job | None


def workers_view(session: Session, operator: User, settings: Settings) -> list[WorkerView]:
    workers = repository.workers(session, operator.id)
    jobs = repository.jobs_by_id(session, operator.id, [w.current_job_id for w in workers if w.current_job_id])
    now = utcnow()
    return [WorkerView(w, is_lost(w, settings, now), jobs.get(w.current_job_id) if w.current_job_id else None)
            for w in workers]


# --- accounts, usage and quotas -------------------------------------------------------------------


@dataclass
class AccountUsage:
    user: User
    studios: int = 0
    pictures: int = 0
    storage_bytes: int = 0
    gpu_minutes: float = 0.0
    gpu_minutes_this_month: float = 0.0


def accounts_view(session: Session, operator: User, storage: Storage | None) -> list[AccountUsage]:
    """Every account with its usage; without ``storage`` the bytes stay 0 (adding them up lists every object)."""
    usage = {user.id: AccountUsage(user) for user in repository.accounts(session, operator.id)}
    for owner_id, count in repository.studio_counts(session, operator.id).items():
        if owner_id in usage:
            usage[owner_id].studios = count
    for owner_id, count in repository.picture_counts(session, operator.id).items():
        if owner_id in usage:
            usage[owner_id].pictures = count
    since = month_start()
    for owner_id, started, finished, beat in repository.job_times(session, operator.id):
        if owner_id in usage:
            usage[owner_id].gpu_minutes += gpu_seconds(started, finished, beat) / 60
            if (finished or beat or started) >= since:
                usage[owner_id].gpu_minutes_this_month += gpu_seconds(started, finished, beat, since) / 60
    for stored in storage.list_objects("users/") if storage is not None else []:
        owner = _owner_of(stored.key)
        if owner is not None and owner in usage:
            usage[owner].storage_bytes += stored.size
    return list(usage.values())


def _owner_of(key: str) -> uuid.UUID | None:
    parts = key.split("/", 2)
    try:
        return uuid.UUID(parts[1]) if len(parts) > 2 else None
    except ValueError:
        return None


def set_active(session: Session, operator: User, user_id: uuid.UUID, active: bool,
               storage: Storage | None = None) -> tuple[User, int]:
    """Disable or re-enable an account; returns it and how many of its jobs were stopped.

    A disabled account's sessions and tokens stop working at its next request (the sign-in lookups
    require an active user), and its queued and running jobs are cancelled: the GPU stops working
    for an account the operator shut out (a queued job ends at once, a running one at the worker's
    next check; with ``storage``, a waiting retry's checkpoint is deleted). Re-enabling starts
    nothing again. An operator cannot disable itself.
    """
    account = repository.get_account(session, operator.id, user_id)
    if account is None:
        raise LookupError("No such account.")
    if account.id == operator.id and not active:
        raise ConsoleError("You cannot disable your own account.")
    stopped = 0
    if account.is_active and not active:
        for job in job_repository.active_jobs_of_owner(session, account.id):
            if not job.cancel_requested:
                job_service.cancel_job(session, job, storage)
                stopped += 1
    account.is_active = active
    session.flush()
    log.info("operator %s %s account %s", operator.id, "enabled" if active else "disabled", account.id,
             extra={"account_id": str(account.id), "jobs_stopped": stopped})
    return account, stopped


def set_quotas(session: Session, operator: User, user_id: uuid.UUID, studios_per_month: int | None,
               gpu_minutes_per_month: int | None) -> User:
    """Set an account's monthly quotas (None: no quota). Raises ValueError for a negative one."""
    for name, value in (("studios per month", studios_per_month), ("GPU minutes per month", gpu_minutes_per_month)):
        if value is not None and value < 0:
            raise ValueError(f"The quota of {name} must be 0 or more (empty: no quota), not {value}.")
    account = repository.get_account(session, operator.id, user_id)
    if account is None:
        raise LookupError("No such account.")
    account.studios_per_month = studios_per_month
    account.gpu_minutes_per_month = gpu_minutes_per_month
    session.flush()
    return account


# --- storage and the prior bank -------------------------------------------------------------------


def storage_kind(key: str) -> str:
    """Which of :data:`STORAGE_KINDS` an object is, from its key (app.storage.base's layout)."""
    if key.startswith("priors/"):
        return "prior bank"
    parts = key.split("/")
    if len(parts) >= 5 and parts[0] == "users" and parts[2] == "subjects":
        return {"photos": "photos", "weights": "weights", "images": "pictures", "zips": "zips",
                "jobs": "jobs"}.get(parts[4], "other")
    return "other"


@dataclass
class BankView:
    bank: PriorBank
    model: str  # the base model's spec when a trained studio names its fingerprint, else the fingerprint
    bytes: int = 0


@dataclass
class StorageView:
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    banks: list[BankView] = field(default_factory=list)


def storage_view(session: Session, operator: User, storage: Storage) -> StorageView:
    if repository.get_operator(session, operator.id) is None:
        raise LookupError("No such page.")
    view = StorageView(bytes_by_kind=dict.fromkeys(STORAGE_KINDS, 0))
    objects: list[StoredObject] = storage.list_objects("users/") + storage.list_objects("priors/")
    bank_bytes: dict[str, int] = defaultdict(int)
    for stored in objects:
        view.bytes_by_kind[storage_kind(stored.key)] += stored.size
        if stored.key.startswith("priors/"):
            bank_bytes[stored.key.split("/")[1]] += stored.size
    names = repository.models_by_fingerprint(session, operator.id)
    view.banks = [BankView(bank, names.get(bank.model_fingerprint, bank.model_fingerprint[:12]),
                           bank_bytes.get(bank.key, 0))
                  for bank in repository.prior_banks(session, operator.id)]
    return view


def clear_prior_bank(session: Session, operator: User, bank_id: uuid.UUID, storage: Storage) -> PriorBank:
    """Delete one bank's row and images: the next job of its class paints them again."""
    bank = repository.get_prior_bank(session, operator.id, bank_id)
    if bank is None:
        raise LookupError("No such prior bank.")
    session.delete(bank)
    session.flush()
    # The row goes first (in this transaction); a worker that pulls the bank meanwhile finds fewer images
    # and paints the missing ones, so a half-deleted folder is harmless.
    storage.delete_prefix(bank.storage_prefix)
    return bank


# --- warming the prior bank -----------------------------------------------------------------------

CLASS_NOUN = re.compile(r"[a-z]+(?: [a-z]+)*")
MAX_CLASS_NOUN = 30
MAX_PRIOR_FILL = 1000


class PriorFillRefused(ValueError):
    """A prior-bank fill that cannot start; the message names what was wrong."""


def check_prior_fill(class_noun: str, count: int) -> str:
    """The class noun of a fill, normalised; :class:`PriorFillRefused` naming the problem otherwise."""
    noun = " ".join(class_noun.lower().split())
    if not CLASS_NOUN.fullmatch(noun) or len(noun) > MAX_CLASS_NOUN:
        raise PriorFillRefused(f"The class must be a noun of letters and spaces, at most {MAX_CLASS_NOUN} "
                               f"characters (like dog, cat, woman), not “{class_noun[:40]}”.")
    if not 1 <= count <= MAX_PRIOR_FILL:
        raise PriorFillRefused(f"The number of images must be between 1 and {MAX_PRIOR_FILL}, not {count}.")
    return noun


def request_prior_fill(session: Session, operator: User, settings: Settings, model_key: str, class_noun: str,
                       count: int) -> str:
    """Send a GPU worker the fill of the bank of an offered model and a class (``priors.fill``); returns
    the class noun as it will be filled. Raises :class:`PriorFillRefused` for an unknown model or bad values."""
    if repository.get_operator(session, operator.id) is None:
        raise LookupError("No such page.")
    offer = base_models.choose(settings, model_key)
    if offer is None:
        raise PriorFillRefused(base_models.unknown_key_message(settings, model_key))
    noun = check_prior_fill(class_noun, count)
    from app.queue import send_operator_command

    send_operator_command("priors.fill", model=offer.key, class_noun=noun, count=str(count))
    log.info("operator %s asked for %d prior images of %r on %s", operator.id, count, noun, offer.key)
    return noun
