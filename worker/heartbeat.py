"""Worker heartbeats: each worker's main process upserts its ``worker_heartbeats`` row every few seconds.

The operator console, ``/readyz`` and ``/metrics`` read these rows; nothing else records which workers
exist (a job's lease names only the process that runs it). The row is keyed "host:pid" of the main
process, the one that lives as long as the worker: every job runs in a fresh child
(``worker_max_tasks_per_child = 1``), and the child writes its job and training speed on its
parent's row (:func:`record_job`), so nothing is lost when the child exits.

GPU facts come from ``nvidia-smi`` (name, memory in use, utilisation): asking CUDA would initialise
it in the main process, which must stay uninitialised before it forks (worker.celery_app).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app import db as studio_db
from app.models import WorkerHeartbeat, utcnow

log = logging.getLogger(__name__)

# Rows of workers not seen for this long are removed (a lost worker stays on the console meanwhile).
FORGET_AFTER = timedelta(days=1)
NVIDIA_SMI_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class GpuFacts:
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilisation: float  # percent


def worker_name(pid: int | None = None) -> str:
    """The row key of the worker whose main process is ``pid`` (default: this process) on this host."""
    return f"{socket.gethostname()}:{pid if pid is not None else os.getpid()}"


def read_gpu(run: Callable[[list[str]], str] | None = None) -> GpuFacts | None:
    """The first visible GPU's facts from ``nvidia-smi``, or None without one (or without nvidia-smi)."""
    if run is None:
        if shutil.which("nvidia-smi") is None:
            return None

        def run(command: list[str]) -> str:
            return subprocess.run(command, capture_output=True, text=True, check=True,
                                  timeout=NVIDIA_SMI_TIMEOUT_SECONDS).stdout

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    command = ["nvidia-smi", "--query-gpu=name,memory.used,memory.total,utilization.gpu",
               "--format=csv,noheader,nounits"]
    if visible:
        command += ["-i", visible]
    try:
        line = run(command).strip().splitlines()[0]
        name, used, total, utilisation = (part.strip() for part in line.split(","))
        mib = 1024 * 1024
        return GpuFacts(name, int(float(used)) * mib, int(float(total)) * mib, float(utilisation))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        log.debug("nvidia-smi gave no GPU facts", exc_info=True)
        return None


def beat(session: Session, name: str, queues: Sequence[str], gpu: GpuFacts | None) -> None:
    """Upsert the worker's row (last seen now) and forget rows not seen for :data:`FORGET_AFTER`."""
    now = utcnow()
    row = session.get(WorkerHeartbeat, name)
    if row is None:
        host, _, pid = name.rpartition(":")
        row = WorkerHeartbeat(name=name, host=host, pid=int(pid) if pid.isdigit() else 0, started_at=now)
        session.add(row)
    row.queues = sorted(queues)
    row.gpu_name = gpu.name if gpu else None
    row.gpu_memory_used_bytes = gpu.memory_used_bytes if gpu else None
    row.gpu_memory_total_bytes = gpu.memory_total_bytes if gpu else None
    row.gpu_utilisation = gpu.utilisation if gpu else None
    row.last_seen_at = now
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.last_seen_at < now - FORGET_AFTER)
                    .execution_options(synchronize_session=False))


def record_job(session: Session, name: str, job_id: uuid.UUID | None, steps_per_second: float | None,
               finished_job: uuid.UUID | None = None) -> None:
    """From a job's child: the job its worker runs now (None once it ended) and the training speed.

    ``finished_job`` clears the row's job only while it is still that job. The speed stays after the
    job, as the worker's speed on its last job.
    """
    values: dict[str, object] = {"current_job_id": job_id}
    if steps_per_second is not None:
        values["steps_per_second"] = steps_per_second
    statement = update(WorkerHeartbeat).where(WorkerHeartbeat.name == name)
    if finished_job is not None:
        statement = statement.where(WorkerHeartbeat.current_job_id == finished_job)
    session.execute(statement.values(**values).execution_options(synchronize_session=False))


# Held while the main process writes its heartbeat, and across every fork (os.register_at_fork below):
# a child must never be forked in the middle of that transaction. SQLite keeps its file locks' state
# in the process's memory, so a child forked mid-transaction believes its parent's lock is its own
# and every write it tries waits out the busy timeout (seen as a job whose new attempt cannot claim).
_BEATING = threading.Lock()
os.register_at_fork(before=_BEATING.acquire, after_in_parent=_BEATING.release, after_in_child=_BEATING.release)


def private_sessions(database_url: str) -> sessionmaker[Session]:
    """Sessions on an engine of one connection for the main process's heartbeat.

    Not the process's shared engine: the main process forks a child per job, and a child must not
    inherit (and use, or close) pooled connections of its parent. A forked child drops this pool
    without closing the parent's connection. On SQLite the connection is not kept between beats
    either (see :data:`_BEATING`): no SQLite file is open in the parent when it forks.
    """
    engine = studio_db.make_engine(database_url, pool_size=1, max_overflow=1)
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    return sessionmaker(bind=engine, expire_on_commit=False)


class Heartbeat:
    """A daemon thread that calls :func:`beat` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, sessions: sessionmaker[Session], queues: Sequence[str], interval: float,
                 gpu: Callable[[], GpuFacts | None] = read_gpu) -> None:
        self.sessions = sessions
        self.name = worker_name()
        self.queues = list(queues)
        self.interval = max(0.1, interval)
        self.gpu = gpu
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def beat_once(self) -> None:
        gpu = self.gpu()
        with _BEATING:
            with studio_db.session_scope(self.sessions) as session:
                beat(session, self.name, self.queues, gpu)
                engine = session.get_bind()
            if engine.dialect.name == "sqlite":
                engine.dispose()  # type: ignore[union-attr]

    def _run(self) -> None:
        while True:
            try:
                self.beat_once()
            except SQLAlchemyError:
                log.warning("the worker heartbeat could not be written; retrying", exc_info=True)
            if self._stop.wait(self.interval):
                return
