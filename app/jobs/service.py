"""Rules on jobs: cancelling, the queue position, and how a job's progress reads to a person.

Services flush, never commit: the request's session dependency owns the transaction.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from app.jobs import estimates, repository
from app.jobs.schemas import JobStatus, StageProgress, StepState
from app.models import Job, utcnow
from app.storage import Storage
from app.storage.base import job_prefix

log = logging.getLogger(__name__)

FINISHED_STATUSES = ("done", "failed", "cancelled")
LOSS_HISTORY_POINTS = 200

# The stepper's steps and their share of the overall progress bar for a job without a plan (made before
# plans, or on a model with no measured speed): a job with one shares the bar by its planned seconds
# (app/jobs/estimates.py), so the bar moves with the work. A "generate more" job only samples.
TRAIN_WEIGHTS = {"preparing": 0.05, "priors": 0.15, "training": 0.6, "generating": 0.2}
GENERATE_WEIGHTS = {"generating": 1.0}
STEP_TITLES = {
    "queued": "In line",
    "preparing": "Preparing photos",
    "priors": "Class priors",
    "training": "Training",
    "generating": "Generating",
    "done": "Done",
}
# Worker stages (app.models.JOB_STAGES) → the stepper step that shows them.
STAGE_TO_STEP = {
    "queued": "queued",
    "preparing": "preparing",
    "priors": "priors",
    "training": "training",
    "sampling": "generating",
    "scoring": "generating",
    "publishing": "generating",
    "finished": "done",
}
IRREGULAR_PLURALS = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
                     "goose": "geese", "sheep": "sheep", "fish": "fish", "deer": "deer", "ox": "oxen"}


class JobNotCancellable(Exception):
    """The job already ended (done, failed or cancelled); the API answers 409."""


def cancel_job(session: Session, job: Job, storage: Storage | None = None) -> None:
    """Cancel ``job``: a queued job ends at once; a running one is asked to stop.

    The worker checks ``cancel_requested`` every few steps and ends the job as cancelled, cleaning
    up its partial files; Celery's revoke cannot stop a running task, so the flag is the contract.
    A queued job may be waiting for its retry with the checkpoint and previews of an earlier attempt:
    the row stops recording them now, and with ``storage`` their files are deleted once the
    transaction commits (no later attempt will resume a cancelled job).
    Raises :class:`JobNotCancellable` for a job that already ended.
    """
    if job.status == "queued":
        job.status = "cancelled"
        job.cancel_requested = True
        job.finished_at = utcnow()
        if job.attempts or job.preview_keys or (job.details or {}).get("checkpoint"):
            job.preview_keys = []
            job.details = {key: value for key, value in (job.details or {}).items() if key != "checkpoint"}
            if storage is not None:
                _delete_after_commit(session, storage, job_prefix(job.owner_id, job.subject_id, job.id))
    elif job.status == "running":
        job.cancel_requested = True
    else:
        raise JobNotCancellable(f"This job has already ended ({job.status}): there is nothing to cancel.")
    session.flush()


_PREFIXES_AFTER_COMMIT = "studio.job_prefixes_after_commit"
_PREFIX_HOOKS = "studio.job_prefix_hooks"


def _delete_after_commit(session: Session, storage: Storage, prefix: str) -> None:
    """Delete the folder ``prefix`` once the session's transaction commits; forget it on a rollback."""
    if not session.info.get(_PREFIX_HOOKS):
        session.info[_PREFIX_HOOKS] = True
        event.listen(session, "after_commit", _delete_pending_prefixes)
        event.listen(session, "after_soft_rollback", _forget_pending_prefixes)
    session.info.setdefault(_PREFIXES_AFTER_COMMIT, []).append((storage, prefix))


def _delete_pending_prefixes(session: Session) -> None:
    for storage, prefix in session.info.pop(_PREFIXES_AFTER_COMMIT, []):
        try:
            storage.delete_prefix(prefix)
        except Exception:
            # Nothing records these files any more: the storage reconciler removes them within hours.
            log.exception("could not delete the files of a cancelled job under %s", prefix)


def _forget_pending_prefixes(session: Session, previous_transaction: Any) -> None:
    if not previous_transaction.nested:
        session.info.pop(_PREFIXES_AFTER_COMMIT, None)


def queue_position(session: Session, job: Job) -> int | None:
    """1 for the next job a worker will take, 2 for the one after...; None unless the job is queued."""
    if job.status != "queued":
        return None
    return repository.count_queued_before(session, job) + 1


def plural(noun: str) -> str:
    """A class noun in the plural, for "reference pictures of dogs"."""
    noun = noun.strip()
    if not noun:
        return "things"
    words = noun.split()
    last = words[-1].lower()
    if last in IRREGULAR_PLURALS:
        plural_last = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        plural_last = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        plural_last = last[:-1] + "ies"
    else:
        plural_last = last + "s"
    return " ".join([*words[:-1], plural_last])


def format_duration(seconds: float | None) -> str:
    """A rounded, human duration for ETAs: "under a minute", "about 4 min", "about 1 h 20 min"; empty when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    if seconds < 60:
        return "under a minute"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"about {hours} h {minutes} min" if minutes else f"about {hours} h"


def format_eta(seconds: float | None) -> str:
    """ "about 2 min left", "under a minute left"; empty when unknown."""
    duration = format_duration(seconds)
    return f"{duration} left" if duration else ""


def ordinal(position: int) -> str:
    suffix = "th" if 10 <= position % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(position % 10, "th")
    return f"{position}{suffix}"


def _int_detail(details: dict[str, Any], name: str) -> int:
    value = details.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def loss_history(details: dict[str, Any]) -> list[float]:
    """The worker's ``details["loss_history"]`` as plain finite floats (numbers or [step, loss] pairs)."""
    raw = details.get("loss_history")
    if not isinstance(raw, list):
        return []
    values: list[float] = []
    for point in raw[-LOSS_HISTORY_POINTS:]:
        candidate = point[-1] if isinstance(point, list | tuple) and point else point
        value = _finite(candidate)
        if value is not None:
            values.append(value)
    return values


MEMORY_FALLBACK_NOTE = (
    "The GPU ran out of memory, so this job went on with lighter settings: slower, with the same result."
)


def job_notes(job: Job) -> list[str]:
    """Sentences about how the run went that a person would want to know (from the worker's details)."""
    details = job.details or {}
    return [MEMORY_FALLBACK_NOTE] if details.get("memory_fallback") else []


def is_demo_model(job: Job) -> bool:
    details = job.details or {}
    return bool(details.get("demo_model")) or details.get("base_model") == "tiny"


def _sampling_counts(job: Job) -> tuple[int, int]:
    details = job.details or {}
    total = _int_detail(details, "images_total")
    if total:
        return _int_detail(details, "images_done"), total
    if job.stage == "sampling":
        return job.step, job.total
    return 0, 0


def _step_fraction(job: Job, step_key: str) -> float:
    """How far the job is inside the stepper step it is currently in."""
    own = 0.0 if job.total <= 0 else min(1.0, max(0.0, job.step / job.total))
    if step_key == "generating":
        done, total = _sampling_counts(job)
        sampled = min(1.0, done / total) if total else own
        # Scoring and publishing are short tails after sampling.
        return {"sampling": 0.9 * sampled, "scoring": 0.9 + 0.05 * own, "publishing": 0.95 + 0.05 * own}.get(
            job.stage, 0.0
        )
    return own


def _priors_label(job: Job, class_noun: str) -> tuple[str, str]:
    """The sentence and the short stepper note for the class-priors stage."""
    details = job.details or {}
    reused = _int_detail(details, "prior_reused")
    what = f"reference pictures of {plural(class_noun)}"
    if job.total > 0 and reused >= job.total:
        return f"Reused {reused} {what} from the shared bank", f"reused {reused}"
    painting = f"Painting {what} ({job.step}/{job.total})" if job.total > 0 else f"Painting {what}"
    if reused:
        return f"{painting} — reused {reused} from the shared bank", f"{job.step}/{job.total}, reused {reused}"
    return painting, f"{job.step}/{job.total}" if job.total > 0 else ""


def _running_label(job: Job, class_noun: str) -> str:
    if job.cancel_requested:
        return "Cancelling…"
    if job.stage == "queued":
        return "Starting…"
    if job.stage == "preparing":
        return "Loading your trained model" if job.kind == "generate" else "Preparing your photos"
    if job.stage == "priors":
        return _priors_label(job, class_noun)[0]
    if job.stage == "training":
        label = f"Training step {job.step}/{job.total}"
        eta = format_eta(remaining_seconds(job))
        return f"{label} — {eta}" if eta else label
    if job.stage == "sampling":
        done, total = _sampling_counts(job)
        return f"Generating pictures {done}/{total}" if total else "Generating pictures"
    if job.stage == "scoring":
        return "Ranking the pictures by likeness"
    if job.stage == "publishing":
        return "Saving your gallery"
    return "Finishing"


def stage_label(job: Job, class_noun: str, position: int | None, wait: float | None = None) -> str:
    """Where the job is, as one sentence: "Waiting in line — 2 jobs ahead", "Training step 120/400 — ..."."""
    if job.status == "done":
        return "Done"
    if job.status == "failed":
        return f"Failed: {job.failure_reason or 'the job stopped without a reason'}"
    if job.status == "cancelled":
        return "Cancelled"
    if job.status == "queued":
        if position is None:
            where = ""
        elif position <= 1:
            where = "next in line"
        else:
            where = f"{position - 1} job{'s' if position != 2 else ''} ahead"
        # A job the reaper put back in line after a lost worker says so, rather than looking stuck.
        lead = f"Waiting to retry (attempt {job.attempts + 1} of {job.max_attempts})" if job.attempts else ""
        if lead:
            return f"{lead} — {where}" if where else lead
        starts = f" (starts in {format_duration(wait)})" if wait is not None and wait >= 1 and where else ""
        if where == "next in line":
            return f"Next in line{starts}"
        return f"Waiting in line — {where}{starts}" if where else "Waiting in line"
    return _running_label(job, class_noun)


def _step_detail(job: Job, key: str, class_noun: str, position: int | None, state: StepState) -> str:
    if key == "queued":
        return f"{ordinal(position)} in line" if state == "active" and position else ""
    if key == "priors":
        details = job.details or {}
        if state == "done":
            reused = _int_detail(details, "prior_reused")
            generated = _int_detail(details, "prior_generated")
            parts = ([f"reused {reused}"] if reused else []) + ([f"{generated} painted"] if generated else [])
            return ", ".join(parts)
        return _priors_label(job, class_noun)[1] if state == "active" else ""
    if state != "active":
        return ""
    if key == "training":
        return f"{job.step}/{job.total}" if job.total else ""
    if key == "generating":
        done, total = _sampling_counts(job)
        return f"{done}/{total}" if total else ""
    return ""


def _weights(job: Job) -> dict[str, float]:
    """Each stepper step's share of the bar: its planned seconds when the job has a plan."""
    base = TRAIN_WEIGHTS if job.kind == "train" else GENERATE_WEIGHTS
    plan = estimates.plan_of(job)
    if plan is None:
        return base
    seconds = {key: plan.get(key, 0.0) for key in base}
    total = sum(seconds.values())
    return {key: value / total for key, value in seconds.items()} if total > 0 else base


# Stages whose engine reports its own time left (from its measured rate).
MEASURED_STAGES = ("priors", "training", "sampling")


def remaining_seconds(job: Job) -> float | None:
    """Seconds until the job is done, not counting a wait in line; None when unknown or ended.

    With a plan: the current step's time left blends the plan with the engine's measured rate, trusting
    the measurement more as the step advances (so the estimate does not jump when a stage starts), plus
    the later steps' planned seconds. Without one: the engine's time left of the current stage.
    """
    if job.status in FINISHED_STATUSES:
        return None
    plan = estimates.plan_of(job)
    measured = _finite(job.eta_seconds) if job.status == "running" and job.stage in MEASURED_STAGES else None
    if plan is None:
        return measured
    current = _current_step(job)
    left, after_current = 0.0, current == "queued"
    for key in _weights(job):
        if after_current:
            left += plan.get(key, 0.0)
        elif key == current:
            done = _step_fraction(job, key)
            planned = plan.get(key, 0.0) * (1.0 - done)
            left += planned if measured is None else done * measured + (1.0 - done) * planned
            after_current = True
    return max(0.0, left)


def queue_wait_seconds(job: Job, running: list[Job], ahead: list[Job]) -> float | None:
    """Seconds until a worker takes the queued ``job``: what the running jobs have left and the queued jobs
    ahead of it take, shared among the busy workers; None when nothing ahead has an estimate."""
    if job.status != "queued":
        return None
    known = [seconds for other in running if (seconds := remaining_seconds(other)) is not None]
    known += [seconds for other in ahead if (seconds := estimates.total_seconds(estimates.plan_of(other))) is not None]
    if not known and (running or ahead):
        return None
    return sum(known) / max(1, len(running))


def _current_step(job: Job) -> str:
    """The stepper step the job is in. A "generate more" job's own preparation (loading the trained
    model) counts as the start of its generating step: it has no separate steps for it."""
    if job.status == "done":
        return "done"
    current = STAGE_TO_STEP.get(job.stage, "queued")
    if current not in ("queued", "done") and current not in _weights(job):
        current = "generating"
    if job.status in ("failed", "cancelled") and current == "done":
        current = list(_weights(job))[-1]
    return current


def stepper(job: Job, class_noun: str, position: int | None) -> list[StageProgress]:
    """The steps of the job in order, each done, active, pending, failed or cancelled."""
    weights = _weights(job)
    keys = ["queued", *weights, "done"]
    current_index = keys.index(_current_step(job))
    steps: list[StageProgress] = []
    for index, key in enumerate(keys):
        state: StepState
        if index < current_index or job.status == "done":
            state, fraction = "done", 1.0
        elif index == current_index:
            state = "active" if job.status in ("queued", "running") else job.status  # type: ignore[assignment]
            fraction = _step_fraction(job, key) if key in weights else 0.0
        else:
            state, fraction = "pending", 0.0
        detail = _step_detail(job, key, class_noun, position, state)
        steps.append(
            StageProgress(key=key, title=STEP_TITLES[key], state=state, fraction=round(fraction, 4), detail=detail)
        )
    return steps


def overall_fraction(job: Job) -> float:
    """Progress across every stage, 0..1, weighted by how long each stage usually takes."""
    if job.status == "done":
        return 1.0
    weights = _weights(job)
    current = _current_step(job)
    if current not in weights:
        return 0.0
    completed = 0.0
    for key, weight in weights.items():
        if key == current:
            return min(1.0, completed + weight * _step_fraction(job, key))
        completed += weight
    return min(1.0, completed)


def preview_urls(job: Job) -> list[str]:
    """URLs of the job's preview images. The ``v`` query changes when the worker replaces a preview,
    so a browser never shows a cached older picture at the same index."""
    urls = []
    for index, key in enumerate(job.preview_keys or []):
        version = hashlib.sha256(key.encode()).hexdigest()[:12]
        urls.append(f"/api/v1/jobs/{job.id}/previews/{index}?v={version}")
    return urls


def describe_job(job: Job, class_noun: str, position: int | None, wait: float | None = None) -> JobStatus:
    """The job's status for the API and the studio page. Pure: no queries, no storage calls.

    ``wait``: the seconds until a worker takes a queued job (:func:`queue_wait_seconds`).
    """
    details = job.details or {}
    left = remaining_seconds(job)
    if job.status == "queued" and left is not None:
        left += wait or 0.0
    return JobStatus(
        id=job.id,
        subject_id=job.subject_id,
        kind=job.kind,
        status=job.status,
        stage=job.stage,
        stage_label=stage_label(job, class_noun, position, wait),
        finished=job.status in FINISHED_STATUSES,
        step=job.step,
        total=job.total,
        fraction=round(overall_fraction(job), 4),
        stages=stepper(job, class_noun, position),
        loss=_finite(job.loss),
        loss_history=loss_history(details),
        eta_seconds=None if left is None else round(left, 1),
        queue_wait_seconds=None if wait is None else round(wait, 1),
        queue_position=position,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        cancel_requested=job.cancel_requested,
        preview_urls=preview_urls(job),
        failure_reason=job.failure_reason,
        demo_model=is_demo_model(job),
        notes=job_notes(job),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def job_status(session: Session, job: Job, class_noun: str) -> JobStatus:
    """:func:`describe_job` with the queue position and the wait looked up (only while queued)."""
    if job.status != "queued":
        return describe_job(job, class_noun, None)
    running, ahead = repository.jobs_ahead(session, job)
    return describe_job(job, class_noun, queue_position(session, job), queue_wait_seconds(job, running, ahead))
