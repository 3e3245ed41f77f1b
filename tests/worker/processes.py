"""Running a real `celery worker` process for end-to-end tests: its environment and its shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy.engine import make_url

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def base_worker_env(settings: Settings) -> dict[str, str]:
    """This process's environment without its STUDIO_* variables, plus those that put a worker on
    ``settings``' database, broker and folders with the tiny model."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("STUDIO_")}
    env.update({
        "STUDIO_ENVIRONMENT": "test",
        "STUDIO_SECRET_KEY": settings.secret_key,
        "STUDIO_VAR_DIR": str(settings.var_dir),
        "STUDIO_DATABASE_URL": settings.resolved_database_url,
        "STUDIO_BROKER_URL": settings.broker_url,
        "STUDIO_MEDIA_DIR": str(settings.resolved_media_dir),
        "STUDIO_BASE_MODEL": "tiny",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def worker_env(settings: Settings, training: dict[str, Any]) -> dict[str, str]:
    """:func:`base_worker_env` with ``training`` overrides (TrainConfig fields), a small prior bank and
    quick heartbeats, leases, cancel checks and progress writes."""
    env = base_worker_env(settings)
    env.update({
        "STUDIO_TRAIN_OVERRIDES": json.dumps(training),
        "STUDIO_PRIOR_IMAGES": "4",
        "STUDIO_PRIOR_STEPS": "4",
        "STUDIO_SAMPLE_STEPS": "4",
        "STUDIO_HEARTBEAT_SECONDS": "1",
        "STUDIO_LEASE_SECONDS": "6",
        "STUDIO_CANCEL_POLL_SECONDS": "0.3",
        "STUDIO_PROGRESS_WRITE_SECONDS": "0.2",
        "OMP_NUM_THREADS": "1",  # two would spin against whatever else runs on a busy machine
    })
    return env


def start_worker(env: dict[str, str], log_path: Path, name: str) -> subprocess.Popen[bytes]:
    """A `celery worker` on the gpu and cpu queues with one slot, logging to ``log_path``, in a session of
    its own (so :func:`stop_worker` stops its children too)."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker", "-Q", "gpu,cpu", "-c",
             "1", "-l", "INFO", "-n", f"{name}-{uuid.uuid4().hex[:8]}@localhost", "--without-gossip",
             "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def wait_until_ready(log_path: Path, worker: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for the worker's "ready" line in its log (it then consumes); RuntimeError if it exits or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists() and " ready." in log_path.read_text(errors="replace"):
            return
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"the worker was not ready within {timeout:.0f} s")


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Kill a worker started with ``start_new_session=True``, children included (its process group).

    Killed, not shut down: the test is over, and Celery's cold shutdown took up to 20 s per rig on
    a busy machine for nothing a test looks at afterwards.
    """
    if worker.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)


def process_group(pid: int) -> list[psutil.Process]:
    """The worker ``pid`` and every process under it (its pool's children)."""
    worker = psutil.Process(pid)
    return [worker, *worker.children(recursive=True)]


def kill_and_wait(worker: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGKILL the worker's process group (parent and job child) and wait until all of it is dead.

    The parent is reaped here; the child is not ours to reap, and a child in the middle of an fsync
    (a checkpoint) dies only when it returns: a deletion before that still sees its owner alive.
    """
    group = process_group(worker.pid)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    deadline = time.monotonic() + timeout
    while not all(_dead(process) for process in group):
        assert time.monotonic() < deadline, f"a killed worker process did not die within {timeout:.0f} s"
        time.sleep(0.05)


def _dead(process: psutil.Process) -> bool:
    """Gone, or a zombie (exited, not yet collected by its new parent)."""
    try:
        return process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def suspended(pid: int, database_url: str, timeout: float = 60) -> Iterator[None]:
    """The worker ``pid`` and its children stopped (SIGSTOP) for the block: it takes nothing meanwhile.

    On SQLite it is stopped only at a moment it holds no write lock: its heartbeat writes every
    second, a stopped process never finishes its transaction, and the test's own writes in the
    block would wait for it until "database is locked" (seen in a make test beside a CPU hog).
    """
    group = process_group(pid)
    deadline = time.monotonic() + timeout
    while True:
        for process in group:
            process.suspend()
        if _writable(database_url):
            break
        for process in group:
            process.resume()
        assert time.monotonic() < deadline, "the worker kept the database locked"
        time.sleep(0.02)
    try:
        yield
    finally:
        for process in group:
            process.resume()


def _writable(database_url: str) -> bool:
    """Whether a write transaction can start now (always, but on SQLite: nobody else is writing)."""
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or not url.database:
        return True
    with contextlib.closing(sqlite3.connect(url.database, timeout=0, isolation_level=None)) as probe:
        try:
            probe.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        probe.execute("ROLLBACK")
    return True
