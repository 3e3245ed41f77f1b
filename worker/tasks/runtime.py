"""One attempt at a job under its lease: claim, heartbeat, cancel checks, throttled progress, fenced writes.

Every GPU task (training, generation) runs the same way:

1. :func:`claim_job` takes the lease (one conditional UPDATE). A delivery that finds the job done,
   cancelled or claimed by a live worker exits quietly; one that finds its attempts used up ends
   the job as failed.
2. :class:`LeasedAttempt` keeps the lease alive from a heartbeat thread, answers the engine's
   ``should_cancel`` (the cancel flag is read from the database at most every ``cancel_poll_seconds``;
   a lost lease or a deleted job stop the run too) and writes progress under the lease, at most every
   ``progress_write_seconds`` except for stage changes.
3. Every file the attempt uploads is remembered, so that an attempt that is cancelled, fails or loses
   its lease can remove what it left behind. A file upload is always followed by a fenced write; if
   that write loses, the file is removed at once and the run stops.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery.exceptions import Reject
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app import db as studio_db
from app import storage as studio_storage
from app.jobs import lease
from app.models import Job, utcnow
from app.storage import Storage
from worker import heartbeat as worker_heartbeat
from worker.scratch import remove_scratch
from worker.settings import WorkerSettings, get_worker_settings

log = logging.getLogger(__name__)

LOSS_HISTORY_LENGTH = 200
PREVIEWS_KEPT = 8


class PublishUncertain(Exception):
    """The final transaction met a database error and the database did not say, in time, whether it committed."""


class StopRun(Exception):
    """The attempt must stop: ``reason`` is "cancelled", "lost" (lease taken over or job ended) or "deleted"."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"run stopped: {reason}")
        self.reason = reason


@dataclass
class WorkerContext:
    """What a task needs from its process: settings, storage, database sessions and a worker name."""

    settings: WorkerSettings
    storage: Storage
    sessions: sessionmaker[Session]
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def transaction(self) -> AbstractContextManager[Session]:
        """A short transaction: commits when the block ends, rolls back on an exception."""
        return studio_db.session_scope(self.sessions)


def is_redelivery(task: Any) -> bool:
    """Whether the broker marked the running task's message as handed out again (Redis does)."""
    delivery_info = getattr(task.request, "delivery_info", None) or {}
    return bool(delivery_info.get("redelivered"))


def default_context() -> WorkerContext:
    return WorkerContext(
        settings=get_worker_settings(), storage=studio_storage.get_storage(), sessions=studio_db.get_sessionmaker()
    )


class DatabaseUnavailable(Exception):
    """The database stayed unreachable for ``claim_retry_seconds``: the task gives its message back."""


# Waits between claims that met an unreachable database: quick at first, then every 15 s.
CLAIM_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


def claim_job(ctx: WorkerContext, job_id: uuid.UUID, redelivered: bool = False,
              sleep: Callable[[float], None] = time.sleep) -> str | None:
    """The lease token, or None after logging why this delivery has nothing to do.

    While the database cannot be reached the claim is tried again with growing waits, holding the
    message (it is acknowledged only when the task ends): failing the task would acknowledge it and
    drop the job from the queue until the reaper's re-send. After ``claim_retry_seconds`` it raises
    :class:`DatabaseUnavailable`, and the task hands the message back to the broker.
    """
    deadline = time.monotonic() + ctx.settings.claim_retry_seconds
    for tries in itertools.count():
        try:
            return _claim_job(ctx, job_id, redelivered)
        except SQLAlchemyError as error:
            if not studio_db.is_database_unavailable(error):
                raise
            wait = CLAIM_RETRY_DELAYS[min(tries, len(CLAIM_RETRY_DELAYS) - 1)]
            if time.monotonic() + wait > deadline:
                raise DatabaseUnavailable(f"job {job_id}: the database was unreachable for "
                                          f"{ctx.settings.claim_retry_seconds} s") from error
            log.warning("job %s: the database is unreachable (%s); claiming again in %.1f s",
                        job_id, type(error.orig if isinstance(error, DBAPIError) else error).__name__, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def give_back_on_outage(run: Callable[[], str]) -> str:
    """Run a job task's body; if the database stayed away through the claim's retries, the task's
    message goes back to the broker (``Reject(requeue=True)``) instead of being acknowledged."""
    try:
        return run()
    except DatabaseUnavailable as error:
        log.warning("%s; handing the task's message back to the broker", error)
        raise Reject(str(error), requeue=True) from error


def _claim_job(ctx: WorkerContext, job_id: uuid.UUID, redelivered: bool) -> str | None:
    """One try of :func:`claim_job`.

    ``redelivered``: the broker handed this task out again, typically because the worker running it
    died. The job then still shows that worker's last heartbeat; rather than leave it to the reaper,
    this delivery waits until the heartbeat is older than the lease and claims it, unless the
    heartbeat moves meanwhile (a live worker holds it: then this is a plain duplicate and exits).
    """
    with ctx.transaction() as session:
        token = lease.claim(session, job_id, ctx.worker_id, ctx.settings.lease_seconds)
    if token is None and redelivered:
        token = _claim_after_dead_lease(ctx, job_id)
    if token is not None:
        log.info("job %s claimed by %s", job_id, ctx.worker_id)
        return token
    with ctx.transaction() as session:
        if lease.fail_if_exhausted(session, job_id, ctx.settings.lease_seconds):
            log.warning("job %s failed: attempts exhausted", job_id)
            return None
        job = session.get(Job, job_id)
        if job is None:
            log.info("job %s no longer exists; nothing to do", job_id)
        else:
            log.info("job %s not claimable (status %s, attempt %d/%d, cancel %s); duplicate or stale delivery",
                     job_id, job.status, job.attempts, job.max_attempts, job.cancel_requested)
    return None


def holder_is_dead(holder: str | None, worker_id: str) -> bool:
    """Whether a lease holder ("host:pid") is provably dead: a process of this host that no longer runs.

    ``worker_id`` is this process's own name: a holder equal to it is a dead process whose pid this
    one now reuses (a task process runs one job, and this one has not claimed yet). A holder on
    another host, or one whose pid is alive (perhaps reused by an unrelated process), is not
    provably dead: the caller then waits for the lease to go stale.
    """
    if not holder or ":" not in holder:
        return False
    host, _, pid_text = holder.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    if holder == worker_id:
        return True
    return not _process_alive(int(pid_text))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    try:
        # A zombie has exited; only its parent has not collected it yet.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _claim_after_dead_lease(ctx: WorkerContext, job_id: uuid.UUID) -> str | None:
    with ctx.transaction() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "running" or job.cancel_requested or job.heartbeat_at is None:
            return None
        last_beat = job.heartbeat_at
        dead_token, holder = job.lease_token, job.lease_holder
    if dead_token and holder and holder_is_dead(holder, ctx.worker_id):
        with ctx.transaction() as session:
            token = lease.take_over(session, job_id, ctx.worker_id, dead_token, holder)
        if token is not None:
            log.info("job %s: redelivered; its lease holder %s is dead on this host, taking over at once",
                     job_id, holder)
            return token
    stale_at = last_beat + timedelta(seconds=ctx.settings.lease_seconds)
    poll = max(0.1, float(ctx.settings.heartbeat_seconds))
    log.info("job %s: redelivered while its lease looks held; waiting up to %.0f s for it to go stale",
             job_id, max(0.0, (stale_at - utcnow()).total_seconds()))
    while utcnow() <= stale_at:
        time.sleep(min(poll, max(0.05, (stale_at - utcnow()).total_seconds() + 0.05)))
        with ctx.transaction() as session:
            beat = session.execute(select(Job.heartbeat_at).where(Job.id == job_id)).scalar_one_or_none()
        if beat != last_beat:
            return None  # a live worker renewed it (or the job ended or is gone)
    with ctx.transaction() as session:
        return lease.claim(session, job_id, ctx.worker_id, ctx.settings.lease_seconds)


class LeasedAttempt:
    """The state of one claimed attempt; use as a context manager to run the heartbeat thread."""

    def __init__(self, ctx: WorkerContext, job: Job, token: str) -> None:
        self.ctx = ctx
        self.job_id = job.id
        self.owner_id = job.owner_id
        self.subject_id = job.subject_id
        self.attempt = job.attempts
        self.token = token
        self.details: dict[str, Any] = dict(job.details or {})
        self.details["attempt"] = job.attempts
        self.preview_keys: list[str] = list(job.preview_keys or [])
        self.stage = job.stage
        self.uploaded: list[str] = []  # keys this attempt wrote that no committed row refers to yet
        self.referenced: set[str] = set()  # keys the next successful progress write will refer to
        # Keys the database still records (an older checkpoint) that go once a write records their successor.
        self.superseded: list[str] = []
        self._stop_reason: str | None = None
        self._lock = threading.Lock()
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._last_cancel_poll = 0.0
        self._last_write = 0.0
        self._pending_values: dict[str, Any] = {}
        self._stage_started = time.monotonic()
        self.scratch: Path | None = None  # the attempt's scratch folder, once it has one
        # The worker's row (worker.heartbeat) is its main process's, this process's parent.
        self.worker_row = worker_heartbeat.worker_name(os.getppid())
        self._training_start: tuple[float, int] | None = None  # (monotonic time, step) of the first step seen
        self.steps_per_second: float | None = None

    # -- heartbeat -----------------------------------------------------------------------------

    def __enter__(self) -> LeasedAttempt:
        self._record_on_worker(self.job_id)
        self._heartbeat_thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True)
        self._heartbeat_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_heartbeat()
        self._record_on_worker(None)

    def _record_on_worker(self, job_id: uuid.UUID | None) -> None:
        """Name the job (or none, once it ended) and the training speed on the worker's heartbeat row."""
        try:
            with self.ctx.transaction() as session:
                worker_heartbeat.record_job(session, self.worker_row, job_id, self.steps_per_second,
                                            finished_job=None if job_id is not None else self.job_id)
        except SQLAlchemyError:
            log.warning("job %s: could not update the worker's heartbeat row", self.job_id, exc_info=True)

    def stop_heartbeat(self) -> None:
        """Stop renewing the lease: called just before the attempt ends the job."""
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None and self._heartbeat_thread is not threading.current_thread():
            self._heartbeat_thread.join(timeout=30)

    def _beat(self) -> None:
        interval = max(0.1, float(self.ctx.settings.heartbeat_seconds))
        while not self._heartbeat_stop.wait(interval):
            try:
                with self.ctx.transaction() as session:
                    alive = lease.heartbeat(session, self.job_id, self.token)
            except SQLAlchemyError:
                # The database may be briefly away; the lease survives until it goes stale.
                log.warning("heartbeat of job %s failed; retrying", self.job_id, exc_info=True)
                continue
            if not alive:
                self._stop(self.why_lost())
                log.warning("job %s: lease lost (heartbeat); stopping this attempt", self.job_id)
                return
            self._record_on_worker(self.job_id)

    # -- stopping ------------------------------------------------------------------------------

    def _stop(self, reason: str) -> None:
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason

    def why_lost(self) -> str:
        """A fenced write lost: "deleted" when the job row is gone, else "lost"."""
        try:
            with self.ctx.transaction() as session:
                reason = lease.should_stop(session, self.job_id, self.token)
        except SQLAlchemyError:
            return "lost"
        return "deleted" if reason == "deleted" else "lost"

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def check_stop(self) -> str | None:
        """Why the attempt must stop, reading the database at most every ``cancel_poll_seconds``."""
        if self._stop_reason is not None:
            return self._stop_reason
        now = time.monotonic()
        if now - self._last_cancel_poll >= self.ctx.settings.cancel_poll_seconds:
            self._last_cancel_poll = now
            try:
                with self.ctx.transaction() as session:
                    reason = lease.should_stop(session, self.job_id, self.token)
            except SQLAlchemyError:
                log.warning("cancel check of job %s failed; going on", self.job_id, exc_info=True)
                reason = None
            if reason is not None:
                self._stop(reason)
        return self._stop_reason

    def should_cancel(self) -> bool:
        """The engine's cancel check."""
        return self.check_stop() is not None

    def raise_if_stopped(self) -> None:
        reason = self.check_stop()
        if reason is not None:
            raise StopRun(reason)

    # -- progress ------------------------------------------------------------------------------

    def write(self, force: bool = False, **values: Any) -> None:
        """Record progress columns; written under the lease now or at the next throttle tick.

        ``details`` and ``preview_keys`` are taken from this object. Raises StopRun when the lease was lost.
        """
        self._pending_values.update(values)
        now = time.monotonic()
        if "stage" in values and values["stage"] != self.stage:
            log.info("job %s: stage %s", self.job_id, values["stage"])
            self._time_stage(values["stage"])
            self.stage = values["stage"]
            force = True
        if self.stage == "training" and isinstance(values.get("step"), int):
            self._measure_speed(now, values["step"])
        if not force and now - self._last_write < self.ctx.settings.progress_write_seconds:
            return
        self.flush()

    def _time_stage(self, next_stage: str) -> None:
        """Add the seconds of the stage that ends to ``details["stage_seconds"]``: the web's time estimates
        (app/jobs/estimates.py) learn each stage's speed on this studio's workers from them."""
        now = time.monotonic()
        if self.stage not in ("queued", None):
            timings = dict(self.details.get("stage_seconds") or {})
            timings[self.stage] = round(float(timings.get(self.stage, 0.0)) + now - self._stage_started, 3)
            self.details["stage_seconds"] = timings
        self._stage_started = now

    def _measure_speed(self, now: float, step: int) -> None:
        """Training steps per second since the first step this attempt saw (recorded in the details)."""
        if self._training_start is None or step < self._training_start[1]:
            self._training_start = (now, step)
            return
        began, first = self._training_start
        if now > began and step > first:
            self.steps_per_second = round((step - first) / (now - began), 4)
            self.details["steps_per_second"] = self.steps_per_second

    def flush(self) -> None:
        values = {**self._pending_values, "details": dict(self.details), "preview_keys": list(self.preview_keys)}
        try:
            with self.ctx.transaction() as session:
                won = lease.update_progress(session, self.job_id, self.token, **values)
        except SQLAlchemyError:
            log.warning("progress write of job %s failed; will retry with the next event", self.job_id, exc_info=True)
            return
        self._pending_values.clear()
        self._last_write = time.monotonic()
        if not won:
            self._stop(self.why_lost())
            raise StopRun(self._stop_reason or "lost")
        self.forget_uploads(list(self.referenced))
        self.referenced.clear()
        # Only now does the database point at the successors: what they replace may go.
        superseded, self.superseded = self.superseded, []
        delete_keys(self.ctx.storage, superseded)

    def supersede(self, keys: list[str]) -> None:
        """Delete ``keys`` after the next successful progress write, which records what replaces them.

        A write that fails (the database is away) is swallowed by :meth:`flush`; the keys then stay until
        a later write succeeds, because the database still points at them and the next attempt resumes there.
        """
        self.superseded.extend(key for key in keys if key not in self.superseded)

    def record_loss(self, loss: float | None) -> None:
        # JSON has no NaN or Infinity (PostgreSQL refuses them): a non-finite loss is left out.
        if loss is None or not math.isfinite(loss):
            return
        history = list(self.details.get("loss_history", []))
        history.append(round(float(loss), 6))
        self.details["loss_history"] = history[-LOSS_HISTORY_LENGTH:]

    # -- ending ----------------------------------------------------------------------------------

    def drop_scratch(self) -> None:
        """Remove the scratch folder now: called before the job row turns final, so that whoever sees the
        job ended also finds its local copies of the photos gone."""
        if self.scratch is not None:
            remove_scratch(self.scratch.parent, self.job_id)

    def unrecord_files(self, previews: bool) -> bool:
        """One fenced write that drops the checkpoint (and with ``previews`` the previews) from the job row;
        True when it won.

        Files the row no longer records may be deleted before the row turns final; if the final write
        then fails, nothing points at a missing file.
        """
        self.details.pop("checkpoint", None)
        if previews:
            self.preview_keys = []
        with self.ctx.transaction() as session:
            return lease.update_progress(session, self.job_id, self.token, details=dict(self.details),
                                         preview_keys=list(self.preview_keys))

    def commit_final(self, write: Callable[[Session], bool], status: str) -> bool:
        """Run the attempt's final transaction ``write`` (which ends the job ``status``); returns its answer.

        A database error does not lose the attempt's work: until ``publish_retry_seconds`` have passed the
        transaction is tried again, with back-off. When the error came at the commit itself, the database
        is asked first whether it committed anyway (the job is ``status`` under this attempt's token).
        Raises :class:`PublishUncertain` when the database never answered that question: the uploads are
        then left alone (a committed row may point at them; the storage reconciler removes them after an
        hour if none does). Any other unanswered error is re-raised.
        """
        deadline = time.monotonic() + max(0.0, float(self.ctx.settings.publish_retry_seconds))
        delay = 0.2
        while True:
            session = self.ctx.sessions()
            committing = False
            try:
                won = write(session)
                session.flush()
                committing = True
                session.commit()
                return won
            except SQLAlchemyError as error:
                log.warning("job %s: the final write met a database error%s; retrying", self.job_id,
                            " at the commit" if committing else "", exc_info=True)
                last_error: Exception = error
                with contextlib.suppress(SQLAlchemyError):  # a dead connection: closing below gives it back
                    session.rollback()
            finally:
                session.close()
            if committing:
                committed = self._wait_for_answer(status, deadline)
                if committed is None:
                    raise PublishUncertain(f"job {self.job_id}: unknown whether the final write committed") \
                        from last_error
                if committed:
                    return True
            if time.monotonic() >= deadline:
                raise last_error
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _wait_for_answer(self, status: str, deadline: float) -> bool | None:
        """Whether the job ended ``status`` under this token; None when the database stayed away."""
        delay = 0.2
        while True:
            try:
                with self.ctx.transaction() as session:
                    row = session.execute(
                        select(Job.status, Job.lease_token).where(Job.id == self.job_id)
                    ).first()
                return row is not None and row.status == status and row.lease_token == self.token
            except SQLAlchemyError:
                if time.monotonic() >= deadline:
                    return None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- files ---------------------------------------------------------------------------------

    def upload(self, key: str, path: Path, content_type: str = "application/octet-stream") -> str:
        self.ctx.storage.put_file(key, path, content_type)
        self.uploaded.append(key)
        return key

    def upload_folder(self, prefix: str, folder: Path) -> list[str]:
        """Upload every file under ``folder`` to ``prefix`` + its relative path."""
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            keys.append(self.upload(prefix + path.relative_to(folder).as_posix(), path))
        return keys

    def forget_uploads(self, keys: list[str]) -> None:
        """``keys`` are now referenced by committed rows: no longer this attempt's to clean up."""
        published = set(keys)
        self.uploaded = [key for key in self.uploaded if key not in published]

    def remove_uploads(self, keep: Callable[[str], bool] = lambda key: False) -> None:
        """Delete what this attempt uploaded and did not publish (except keys ``keep`` accepts)."""
        for key in self.uploaded:
            if keep(key):
                continue
            try:
                self.ctx.storage.delete(key)
            except Exception:
                log.warning("could not delete %s of job %s", key, self.job_id, exc_info=True)
        self.uploaded = [key for key in self.uploaded if keep(key)]


def download_prefix(storage: Storage, prefix: str, folder: Path) -> list[Path]:
    """Download every object under ``prefix`` into ``folder`` (keeping relative paths)."""
    paths = []
    for key in storage.list(prefix):
        target = folder / key[len(prefix):]
        storage.download_to(key, target)
        paths.append(target)
    return paths


def delete_keys(storage: Storage, keys: list[str]) -> None:
    for key in keys:
        try:
            storage.delete(key)
        except Exception:
            log.warning("could not delete %s", key, exc_info=True)
