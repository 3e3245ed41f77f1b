"""Running a real `celery worker` process for end-to-end tests: its environment and its shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def worker_env(settings: Settings, training: dict[str, Any]) -> dict[str, str]:
    """A worker's environment on ``settings``: the tiny model, ``training`` overrides (TrainConfig fields),
    a small prior bank and quick heartbeats, leases, cancel checks and progress writes."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("STUDIO_")}
    env.update({
        "STUDIO_ENVIRONMENT": "test",
        "STUDIO_SECRET_KEY": settings.secret_key,
        "STUDIO_VAR_DIR": str(settings.var_dir),
        "STUDIO_DATABASE_URL": settings.resolved_database_url,
        "STUDIO_BROKER_URL": settings.broker_url,
        "STUDIO_MEDIA_DIR": str(settings.resolved_media_dir),
        "STUDIO_BASE_MODEL": "tiny",
        "STUDIO_TRAIN_OVERRIDES": json.dumps(training),
        "STUDIO_PRIOR_IMAGES": "4",
        "STUDIO_PRIOR_STEPS": "4",
        "STUDIO_SAMPLE_STEPS": "4",
        "STUDIO_HEARTBEAT_SECONDS": "1",
        "STUDIO_LEASE_SECONDS": "6",
        "STUDIO_CANCEL_POLL_SECONDS": "0.3",
        "STUDIO_PROGRESS_WRITE_SECONDS": "0.2",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "2",
    })
    return env


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Stop a worker started with ``start_new_session=True``, children included."""
    if worker.poll() is None:
        # Cold shutdown of the worker we started, by its own process group id.
        os.killpg(worker.pid, signal.SIGQUIT)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=15)
