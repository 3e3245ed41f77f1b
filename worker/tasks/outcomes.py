"""How an attempt ends when it does not publish: failure reasons a person understands, and clean-up.

Reasons are sentences for the studio's page; the technical detail goes to the worker's log only
(never photo bytes or personal data).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from celery.exceptions import SoftTimeLimitExceeded

from app.jobs import lease
from app.storage import StorageError, StorageFull
from app.storage.base import checkpoint_prefix, job_prefix
from worker.engine.errors import Cancelled, EngineInputError, PhotosUnusable, TrainingDiverged
from worker.tasks.engine_adapter import is_out_of_memory
from worker.tasks.runtime import LeasedAttempt, StopRun

log = logging.getLogger(__name__)

DIVERGED_REASON = "Training diverged (the loss became NaN); try the fast preset or fewer steps."
OUT_OF_MEMORY_REASON = (
    "The GPU ran out of memory while running this job, even with lighter settings. Try the fast preset "
    "or fewer photos; if it keeps happening the worker needs a GPU with more memory."
)
DISK_FULL_REASON = (
    "The worker's disk is full, so this job could not work on its files. Use “Try again” in a while; if it "
    "keeps happening, the studio's operator needs to free disk space on the worker."
)
STORAGE_FULL_REASON = (
    "The studio's storage is full, so this job could not save its results. Your photos are kept: use "
    "“Try again” once the studio's operator has freed space in its storage."
)
STORAGE_REASON = "The studio could not read or write its files (storage error). Use “Try again” in a while."
UNKNOWN_REASON = (
    "Something went wrong in the worker while running this job. The error was logged; use “Try again”."
)


class JobFailure(Exception):
    """Ends the job as failed with ``reason``, a sentence for the person whose job it is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure_reason(exc: BaseException, hard_limit_seconds: int) -> str:
    """The sentence a person reads for ``exc``."""
    if isinstance(exc, JobFailure):
        return exc.reason
    if isinstance(exc, PhotosUnusable):
        return f"Some photos could not be used: {exc}"
    if isinstance(exc, EngineInputError):
        return f"The studio could not start this job: {exc}"
    if isinstance(exc, TrainingDiverged):
        return DIVERGED_REASON
    if is_out_of_memory(exc):
        return OUT_OF_MEMORY_REASON
    if isinstance(exc, SoftTimeLimitExceeded):
        minutes = max(1, hard_limit_seconds // 60)
        return f"The job ran longer than the time limit (about {minutes} minutes) and was stopped."
    if _caused_by(exc, StorageFull):
        return STORAGE_FULL_REASON  # the shared media storage, not this worker's disk
    if is_disk_full(exc):
        return DISK_FULL_REASON
    if isinstance(exc, StorageError | OSError):
        return STORAGE_REASON
    return UNKNOWN_REASON


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """True when ``exc``, or an error it was raised from, is a ``kind``."""
    seen: BaseException | None = exc
    for _ in range(10):  # a cause chain is short; the bound only guards against a cycle
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc``, or an error it was raised from, is "no space left on device"."""
    seen: BaseException | None = exc
    for _ in range(10):  # a cause chain is short; the bound only guards against a cycle
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def settle(attempt: LeasedAttempt, run: Callable[[], str], hard_limit_seconds: int) -> str:
    """``run()`` the attempt's work and return its outcome; a stop, a cancel or an error ends the job here.

    The one policy both tasks follow: a lost lease or a deleted subject (StopRun) and a cancel end
    the attempt quietly; any other error is logged and ends the job ``failed`` with its sentence.
    """
    try:
        return run()
    except StopRun as stop:
        return end_stopped(attempt, stop.reason)
    except Cancelled:
        return end_stopped(attempt, attempt.stop_reason or "cancelled")
    except Exception as exc:
        log.exception("job %s attempt %d failed", attempt.job_id, attempt.attempt)
        return end_failed(attempt, failure_reason(exc, hard_limit_seconds))


def job_files_prefix(attempt: LeasedAttempt) -> str:
    """The folder of one job's transient files: previews and checkpoints."""
    return job_prefix(attempt.owner_id, attempt.subject_id, attempt.job_id)


def end_failed(attempt: LeasedAttempt, reason: str) -> str:
    """Mark the job failed (fenced), its unpublished files, checkpoints and scratch removed first.

    The clean-up comes before the job turns final, so whoever sees it failed finds nothing left. The
    checkpoint is dropped from the row (a fenced write) before its files go: if this attempt lost its
    lease, a new holder may resume from it and it stays.
    """
    attempt.stop_heartbeat()
    attempt.drop_scratch()
    attempt.remove_uploads()  # never referenced by a committed row: safe whatever the writes below do
    if not attempt.unrecord_files(previews=False):
        return end_stopped(attempt, "lost")
    # No attempt resumes a failed job: its checkpoints are dead weight.
    attempt.ctx.storage.delete_prefix(checkpoint_prefix(attempt.owner_id, attempt.subject_id, attempt.job_id))
    with attempt.ctx.transaction() as session:
        won = lease.finish(session, attempt.job_id, attempt.token, "failed", failure_reason=reason,
                           details=dict(attempt.details), preview_keys=list(attempt.preview_keys))
    if not won:
        return end_stopped(attempt, "lost")
    return "failed"


def end_stopped(attempt: LeasedAttempt, reason: str) -> str:
    """End an attempt that was told to stop: cancelled, lost its lease, or its job was deleted.

    Scratch and unpublished uploads go first; a cancelled job's previews and checkpoints go before
    its row says cancelled.
    """
    storage = attempt.ctx.storage
    attempt.stop_heartbeat()
    attempt.drop_scratch()
    attempt.remove_uploads()
    if reason == "cancelled":
        if not attempt.unrecord_files(previews=True):
            return end_stopped(attempt, "lost")
        storage.delete_prefix(job_files_prefix(attempt))
        with attempt.ctx.transaction() as session:
            won = lease.finish(session, attempt.job_id, attempt.token, "cancelled", details=dict(attempt.details),
                               preview_keys=[])
        if not won:
            return end_stopped(attempt, "lost")
        log.info("job %s cancelled; partial files removed", attempt.job_id)
        return "cancelled"
    if reason == "deleted":
        storage.delete_prefix(job_files_prefix(attempt))
        log.info("job %s was deleted while running; its files are removed", attempt.job_id)
        return "deleted"
    # Lost: another attempt may hold the lease now and rely on the recorded previews and checkpoint,
    # so only what this attempt never recorded went.
    log.warning("job %s: this attempt lost its lease and publishes nothing", attempt.job_id)
    return "lost"
